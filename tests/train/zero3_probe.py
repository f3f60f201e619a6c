"""Run under torchrun by test_zero3.py: build the model as training does, take one step, report.

Writes one JSON file per rank (OUT_DIR/probe_rank<r>.json): how much of the frozen base this rank
holds (per partitioned piece: a parameter under DeepSpeed's stage-3 engine, a layer's flat shard under
mixlora_ds's), which parameters received gradients, and whether the MoE blocks are ZeRO-3 leaf modules.
"""

from __future__ import annotations

import json
import sys

import torch


def held_frozen(built, model) -> dict[str, tuple[int, int]]:
    """{piece: (elements of this rank's partition, elements of the whole piece)} of the frozen base:
    a parameter's partition under DeepSpeed's engine; a layer's flat shard under mixlora_ds's (what it
    keeps gathered besides is ``gathered_units``)."""
    if built.sharded_base is not None:
        return {s.name: (s.shard_S.numel(), s.numel) for s in built.sharded_base.all_shards()}
    return {n: (p.ds_tensor.numel(), p.ds_numel) for n, p in model.named_parameters()
            if not p.requires_grad and hasattr(p, "ds_tensor")}


def gathered_units(built) -> list[str]:
    """The units of mixlora_ds's sharded base whose full weights hold memory now."""
    return sorted({s.name.split("[")[0] for s in built.sharded_base.all_shards() if s.live_bytes > 0})


def views_of_their_shards(built) -> bool:
    """Every sharded parameter still reads its flat shard's buffer (the engine re-pointed none)."""
    return all(p.untyped_storage()._cdata == s.full_F.untyped_storage()._cdata
               for s in built.sharded_base.all_shards() for p in s.params)


class WholeWatch:
    """While mixlora_ds re-shards a zero.Init-partitioned base it gathers one unit at a time: the most
    bytes of frozen weights held whole at once, seen as each flat shard is made (a spy: it records,
    and calls what it wraps unchanged)."""

    def __init__(self):
        import mixlora_ds.parallel.frozen_base as frozen_base

        self.peak, self.units, self.frozen = 0, [], []
        make_shard, shard_base = frozen_base.FlatShard.__init__, frozen_base.shard_frozen_base

        def on_shard(shard, name, params, *args, **kwargs):
            storages = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in self.frozen}
            self.peak = max(self.peak, sum(storages.values()))
            self.units.append(sum(p.numel() * p.element_size() for p in params))
            make_shard(shard, name, params, *args, **kwargs)

        def on_shard_base(model, *args, **kwargs):
            self.frozen = [p for p in model.parameters() if not p.requires_grad]
            return shard_base(model, *args, **kwargs)

        frozen_base.FlatShard.__init__ = on_shard
        frozen_base.shard_frozen_base = on_shard_base


def main(config_path: str, out_dir: str) -> None:
    from deepspeed.utils import safe_get_full_grad

    from mixlora_ds import dist
    from mixlora_ds.model.moe import MixLoraMoeBlock
    from mixlora_ds.train.batches import BatchStream, model_inputs, token_ce
    from mixlora_ds.train.build import build_model, start_engine
    from mixlora_ds.train.config import load_config
    from mixlora_ds.train.plan import make_plan

    cfg = load_config(config_path)
    plan = make_plan(cfg, dist.world_size())
    dist.init_distributed(1)
    whole = WholeWatch()
    built = build_model(plan)
    # Before the engine exists: the base is already sharded, nothing gathered.
    frozen_before = held_frozen(built, built.model)
    gathered_before = gathered_units(built) if built.sharded_base is not None else None
    engine = start_engine(built, plan.engine_ds_config)
    stream = BatchStream(cfg.data.train_dir, "train", 1, cfg.seed, True, True, dist.rank(), dist.world_size())

    def forward_backward() -> None:
        batch = stream.next()
        logits = engine(**model_inputs(batch, "sdpa", torch.device("cpu"), torch.float32)).logits
        engine.backward(token_ce(logits, batch["labels"]).sum())

    # One full optimizer step first: LoRA B starts at zero, which makes A's first gradient zero.
    for _ in range(plan.grad_accum):
        forward_backward()
        engine.step()
    # Then the micro-batches of a second step, reading gradients before they are applied.
    for _ in range(plan.grad_accum):
        forward_backward()
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
    grads = {}
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p) if p.requires_grad else p.grad  # a collective: every rank, same order
        grads[n] = None if g is None else float(g.abs().sum())
    frozen_after = held_frozen(built, engine.module)
    sharding = None
    if built.sharded_base is not None:
        sharding = {"views_of_shards": views_of_their_shards(built), "whole_peak_bytes": whole.peak,
                    "gathered_before": gathered_before, "gathered_after": gathered_units(built),
                    "largest_unit_bytes": max(whole.units), "base_bytes": sum(whole.units)}
    blocks = [m for m in engine.module.modules() if isinstance(m, MixLoraMoeBlock)]
    report = json.dumps({
        "rank": dist.rank(), "world": dist.world_size(), "impl": cfg.deepspeed.zero3_impl,
        "frozen_before": frozen_before, "frozen_after": frozen_after, "sharding": sharding,
        "trainable": sorted(n for n, p in engine.module.named_parameters() if p.requires_grad),
        "grads": grads,
        "leaf_blocks": [bool(getattr(b, "_z3_leaf", False)) for b in blocks],
    })
    with open(f"{out_dir}/probe_rank{dist.rank()}.json", "w") as f:
        f.write(report)


if __name__ == "__main__":
    from mixlora_ds import dist

    main(sys.argv[1], sys.argv[2])
    # As launch/train.py leaves: together, and without the interpreter teardown that was seen to
    # abort a finished rank ("terminate called without an active exception").
    dist.shutdown()
    dist.exit_now(0)
