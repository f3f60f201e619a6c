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
    """{piece: (elements held by this rank, elements of the whole piece)} of the frozen base."""
    if built.sharded_base is not None:
        return {s.name: (s.held_numel, s.numel) for s in built.sharded_base.all_shards()}
    return {n: (p.ds_tensor.numel(), p.ds_numel) for n, p in model.named_parameters()
            if not p.requires_grad and hasattr(p, "ds_tensor")}


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
    built = build_model(cfg, plan.ds_config, plan.precision, plan.stage)
    # Before the engine exists: the base is already sharded, nothing gathered.
    frozen_before = held_frozen(built, built.model)
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
    gathered_after = ([s.name for s in built.sharded_base.all_shards() if s.gathered]
                      if built.sharded_base is not None else [])
    blocks = [m for m in engine.module.modules() if isinstance(m, MixLoraMoeBlock)]
    report = json.dumps({
        "rank": dist.rank(), "world": dist.world_size(), "impl": cfg.deepspeed.zero3_impl,
        "frozen_before": frozen_before, "frozen_after": frozen_after, "gathered_after": gathered_after,
        "trainable": sorted(n for n, p in engine.module.named_parameters() if p.requires_grad),
        "grads": grads,
        "leaf_blocks": [bool(getattr(b, "_z3_leaf", False)) for b in blocks],
    })
    with open(f"{out_dir}/probe_rank{dist.rank()}.json", "w") as f:
        f.write(report)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
