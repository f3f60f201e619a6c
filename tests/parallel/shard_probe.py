"""Run under torchrun (gloo, 2 ranks) by test_frozen_base.py; writes OUT_DIR/rank<r>.json.
``--device cuda`` runs the same checks on one GPU per rank with NCCL (asynchronous gathers for real).

For tiny models of every family with MixLoRA (random adapter values) and for a LoRA baseline, each
rank compares the model with its frozen base sharded (``shard_frozen_base``) against the same model
unsharded, on this rank's own input: logits, the loss, and the gradient of every trainable tensor,
in training mode with and without activation checkpointing, with a compiled layer forward, and in
an evaluation forward. It also records how much of the base each rank holds, how many layers are
gathered at once, and that nothing stays gathered after a step.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mixlora_ds import MixLoraConfig, inject_mixlora  # noqa: E402
from mixlora_ds.model.inject import decoder_layers  # noqa: E402
from mixlora_ds.parallel.frozen_base import shard_frozen_base  # noqa: E402
from mixlora_ds.train.build import enable_checkpointing  # noqa: E402
from mixlora_ds.zero import gathered  # noqa: E402
from tests.core.tiny_models import FAMILIES, VOCAB, randomize_adapter, targets_for, tiny_model  # noqa: E402


DEVICE = torch.device("cpu")


def adapted(family: str, peft_type: str = "MIXLORA"):
    model = tiny_model(family, seed=3)
    extra = dict(num_experts=4, top_k=2) if peft_type == "MIXLORA" else {}
    inject_mixlora(model, MixLoraConfig(peft_type=peft_type, r=4, lora_alpha=8, lora_dropout=0.0,
                                        target_modules=targets_for(family), **extra))
    randomize_adapter(model, std=0.1, seed=5)
    model.enable_input_require_grads()
    return model.to(DEVICE).train()


def step(model, ids):
    """Logits and loss of one forward, and the gradient of every trainable tensor."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), float(loss), grads


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class GatherWatch:
    """The largest number of layer units whose full weights take memory at once (gathered, or
    being gathered), seen at every layer's entry."""

    def __init__(self, sharded):
        self.sharded, self.peak = sharded, 0
        for layer in sharded.layers:
            layer.register_forward_pre_hook(self.look)

    def look(self, module, args):
        live = sum(any(s.full_F.untyped_storage().nbytes() > 0 for s in u.shards) for u in self.sharded.units)
        self.peak = max(self.peak, live)


def compare(family: str, peft_type: str, rank: int, checkpointing: bool = False, compiled: bool = False) -> dict:
    reference = adapted(family, peft_type)
    sharded_model = copy.deepcopy(reference)
    if checkpointing:
        enable_checkpointing(reference)
        enable_checkpointing(sharded_model)
    sharded = shard_frozen_base(sharded_model, decoder_layers(sharded_model), group=None)
    watch = GatherWatch(sharded)
    if compiled:
        for layer in decoder_layers(sharded_model):
            layer.forward = torch.compile(layer.forward, backend="aot_eager")
    held, full = sharded.held_numel()
    g = torch.Generator().manual_seed(100 + rank)
    out = {"held": held, "full": full, "steps": []}
    for _ in range(2):  # state must reset between steps
        ids = torch.randint(3, VOCAB, (2, 12), generator=g).to(DEVICE)
        ref_logits, ref_loss, ref_grads = step(reference, ids)
        logits, loss, grads = step(sharded_model, ids)
        out["steps"].append({
            "logits": float((logits - ref_logits).abs().max()), "loss": abs(loss - ref_loss),
            "grads": max_diff(grads, ref_grads), "grad_size": max(float(v.abs().max()) for v in ref_grads.values()),
            "gathered_after": [s.name for s in sharded.all_shards() if s.gathered],
        })
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 12), generator=g).to(DEVICE)
        diff = (sharded_model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()
    out["eval_logits"] = float(diff)
    out["gathered_after_eval"] = [s.name for s in sharded.all_shards() if s.gathered]
    out["peak_layers_gathered"] = watch.peak
    out["layers"] = len(sharded.units)
    return out


def gathered_outside_forward(rank: int) -> dict:
    """``mixlora_ds.zero.gathered`` on sharded parameters: whole values inside, freed again after."""
    reference = adapted("llama")
    model = copy.deepcopy(reference)
    sharded = shard_frozen_base(model, decoder_layers(model), group=None)
    name = "model.layers.1.mlp.base_mlp.down_proj.weight"
    p, ref = dict(model.named_parameters())[name], dict(reference.named_parameters())[name]
    with gathered([p]):
        inside = float((p - ref).abs().max())
    shard = next(s for s in sharded.all_shards() if any(q is p for q in s.params))
    return {"inside": inside, "freed_after": not shard.gathered,
            "storage_after": p.untyped_storage().nbytes()}


def main(out_dir: str, device: str = "cpu") -> None:
    global DEVICE
    tdist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = tdist.get_rank()
    if device == "cuda":
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(DEVICE)
    torch.manual_seed(0)
    report = {"rank": rank, "world": tdist.get_world_size(), "families": {}}
    for family in FAMILIES:
        report["families"][family] = compare(family, "MIXLORA", rank)
    report["lora_baseline"] = compare("llama", "LORA", rank)
    report["checkpointing"] = compare("llama", "MIXLORA", rank, checkpointing=True)
    report["compiled"] = compare("llama", "MIXLORA", rank, compiled=True)
    report["compiled_checkpointing"] = compare("qwen2", "MIXLORA", rank, checkpointing=True, compiled=True)
    report["gathered"] = gathered_outside_forward(rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    main(a.out_dir, a.device)
