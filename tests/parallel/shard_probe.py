"""Run under torchrun (gloo, 2 ranks) by test_frozen_base.py; writes OUT_DIR/rank<r>.json.
``--device cuda`` runs the same checks on one GPU per rank with NCCL (asynchronous gathers for real).

For tiny models (4 decoder layers) of every family with MixLoRA (random adapter values), LoRA and
DoRA baselines, each rank compares the model with its frozen base sharded (``shard_frozen_base``)
against the same model unsharded, on this rank's own input: logits, the loss (cross-entropy plus
MixLoRA's router loss, whose gradient enters each layer in the middle), and the gradient of every
trainable tensor, in training mode with and without activation checkpointing, with a compiled layer
forward, without prefetching, two layers ahead and past the last layer, with inputs that need no
gradient, and in an evaluation forward (on GPUs also gathered by copy engine); and in the orders
of calls a caller may use besides forward-then-backward. It also records how much of the base each
rank holds, how many layers hold memory at once in forward and in backward, and what stays gathered
after a step (what the next forward needs first) and after an evaluation forward (nothing).
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
from mixlora_ds.model.aux_loss import mixlora_aux_loss  # noqa: E402
from mixlora_ds.model.inject import decoder_layers  # noqa: E402
from mixlora_ds.model.moe import set_compute_path  # noqa: E402
from mixlora_ds.model.partitioned import gathered  # noqa: E402
from mixlora_ds.parallel.frozen_base import shard_frozen_base  # noqa: E402
from mixlora_ds.train.build import enable_checkpointing  # noqa: E402
from tests.core.tiny_models import FAMILIES, VOCAB, randomize_adapter, targets_for, tiny_model  # noqa: E402

DEVICE = torch.device("cpu")
LAYERS = 4


def adapted(family: str, peft_type: str = "MIXLORA", input_grads: bool = True, **adapter):
    model = tiny_model(family, seed=3, num_hidden_layers=LAYERS, use_cache=False)
    if peft_type == "MIXLORA":
        adapter = dict(num_experts=4, top_k=2) | adapter
    inject_mixlora(model, MixLoraConfig(peft_type=peft_type, r=4, lora_alpha=8, lora_dropout=0.0,
                                        target_modules=targets_for(family), **adapter))
    randomize_adapter(model, std=0.1, seed=5)
    if input_grads:  # (as gradient checkpointing with a frozen embedding needs)
        model.enable_input_require_grads()
    return model.to(DEVICE).train()


def loss_of(model, ids):
    logits = model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return ce + mixlora_aux_loss(model), logits


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def step(model, ids):
    """Logits and loss of one forward, and the gradient of every trainable tensor."""
    model.zero_grad(set_to_none=True)
    loss, logits = loss_of(model, ids)
    loss.backward()
    return logits.detach(), float(loss.detach()), grads_of(model)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def live(units) -> int:
    """Units whose full weights take memory now (gathered, or being gathered)."""
    return sum(any(s.live_bytes > 0 for s in u.shards) for u in units)


class GatherWatch:
    """The largest number of layer units holding memory at once: at every layer's forward entry, and
    after every layer's step of backward (freeing the layer above, gathering the next ones)."""

    def __init__(self, sharded):
        self.sharded, self.forward, self.backward = sharded, 0, 0
        for layer in sharded.layers:
            layer.register_forward_pre_hook(self.look_forward)
        original = sharded._before_layer_backward

        def watched(i):
            original(i)
            self.backward = max(self.backward, live(self.sharded.units))
        sharded._before_layer_backward = watched

    def look_forward(self, module, args):
        self.forward = max(self.forward, live(self.sharded.units))


def holding(sharded) -> list[str]:
    """The units holding memory, by name ("outer", "layer 0", ...)."""
    return sorted({s.name.split("[")[0] for s in sharded.all_shards() if s.live_bytes > 0})


def compare(family: str, peft_type: str, rank: int, checkpointing: bool = False, compiled: bool = False,
            prefetch_layers: int = 1, transport: str = "nccl", input_grads: bool = True, **adapter) -> dict:
    reference = adapted(family, peft_type, input_grads, **adapter)
    sharded_model = copy.deepcopy(reference)
    if checkpointing:
        enable_checkpointing(reference)
        enable_checkpointing(sharded_model)
    sharded = shard_frozen_base(sharded_model, decoder_layers(sharded_model), group=None, transport=transport,
                                prefetch_layers=prefetch_layers)
    watch = GatherWatch(sharded)
    if compiled:
        for layer in decoder_layers(sharded_model):
            layer.forward = torch.compile(layer.forward, backend="aot_eager")
    held, full = sharded.held_numel()
    g = torch.Generator().manual_seed(100 + rank)
    out = {"held": held, "full": full, "prefetch_layers": prefetch_layers, "steps": []}
    for _ in range(2):  # state must reset between steps
        ids = torch.randint(3, VOCAB, (2, 12), generator=g).to(DEVICE)
        ref_logits, ref_loss, ref_grads = step(reference, ids)
        logits, loss, grads = step(sharded_model, ids)
        out["steps"].append({
            "logits": float((logits - ref_logits).abs().max()), "loss": abs(loss - ref_loss),
            "grads": max_diff(grads, ref_grads), "grad_size": max(float(v.abs().max()) for v in ref_grads.values()),
            "holding_after": holding(sharded),
        })
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 12), generator=g).to(DEVICE)
        diff = (sharded_model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()
    out["eval_logits"] = float(diff)
    out["holding_after_eval"] = holding(sharded)
    out["peak_layers_forward"], out["peak_layers_backward"] = watch.forward, watch.backward
    out["layers"] = len(sharded.units)
    out["transport"] = sharded.transport
    return out


# Orders of calls besides forward-then-backward; each returns the trainable gradients it leaves.
def eval_forward_between(model, ids):
    loss, _ = loss_of(model, ids)
    with torch.no_grad():  # frees every gathered weight, the LM head's included
        model(input_ids=ids)
    loss.backward()
    return grads_of(model)


def backward_twice(model, ids):
    loss, _ = loss_of(model, ids)
    loss.backward(retain_graph=True)
    loss.backward()
    return grads_of(model)


def two_forwards_two_backwards(model, ids):
    first, _ = loss_of(model, ids)
    second, _ = loss_of(model, ids.flip(0))
    first.backward()
    second.backward()
    return grads_of(model)


PATTERNS = {f.__name__: f for f in (eval_forward_between, backward_twice, two_forwards_two_backwards)}


def call_orders(rank: int) -> dict:
    out = {}
    for name, pattern in PATTERNS.items():
        reference = adapted("llama")
        # A second backward through a retained graph fails in graphs PyTorch compiled with donated
        # buffers (the per-pair math on GPUs); these orders test the sharding, so keep it eager.
        set_compute_path(reference, "dense", compiled=False)
        model = copy.deepcopy(reference)
        sharded = shard_frozen_base(model, decoder_layers(model), group=None)
        ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7 + rank)).to(DEVICE)
        expected = pattern(reference, ids)
        out[name] = {"grads": max_diff(pattern(model, ids), expected), "holding_after": holding(sharded)}
    return out


def cast_on_sharding(rank: int) -> dict:
    """``dtype=``: frozen weights of another dtype (here one norm in float64) come out in the run's."""
    reference = adapted("llama")
    model = copy.deepcopy(reference)
    model.model.layers[1].input_layernorm.double()
    shard_frozen_base(model, decoder_layers(model), group=None, dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(9 + rank)).to(DEVICE)
    dtypes = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
    return {"frozen_dtypes": dtypes, "grads": max_diff(step(model, ids)[2], step(reference, ids)[2])}


def gathered_outside_forward(rank: int) -> dict:
    """``mixlora_ds.model.partitioned.gathered`` on sharded parameters: whole values inside, freed again after."""
    reference = adapted("llama")
    model = copy.deepcopy(reference)
    sharded = shard_frozen_base(model, decoder_layers(model), group=None)
    name = "model.layers.1.mlp.base_mlp.down_proj.weight"
    p, ref = dict(model.named_parameters())[name], dict(reference.named_parameters())[name]
    with gathered([p]):
        inside = float((p - ref).abs().max())
    shard = next(s for s in sharded.all_shards() if any(q is p for q in s.params))
    try:
        with gathered([p], modifier_rank=0):
            refused = ""
    except ValueError as e:
        refused = str(e)
    return {"inside": inside, "freed_after": not shard.gathered, "storage_after": p.untyped_storage().nbytes(),
            "write_refused": refused}


def main(out_dir: str, device: str = "cpu") -> None:
    global DEVICE
    tdist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = tdist.get_rank()
    if device == "cuda":
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(DEVICE)
    torch.manual_seed(0)
    report = {"rank": rank, "world": tdist.get_world_size(), "device": device, "cases": {}}
    cases = report["cases"]
    for family in FAMILIES:
        cases[f"mixlora {family}"] = compare(family, "MIXLORA", rank)
    cases["lora"] = compare("llama", "LORA", rank)
    cases["dora qwen2 (biases)"] = compare("qwen2", "LORA", rank, use_dora=True)
    cases["checkpointing"] = compare("llama", "MIXLORA", rank, checkpointing=True)
    cases["compiled"] = compare("llama", "MIXLORA", rank, compiled=True)
    cases["compiled checkpointing"] = compare("qwen2", "MIXLORA", rank, checkpointing=True, compiled=True)
    cases["no prefetch"] = compare("llama", "MIXLORA", rank, prefetch_layers=0)
    cases["prefetch 2"] = compare("llama", "MIXLORA", rank, prefetch_layers=2)
    cases["prefetch past the last layer"] = compare("llama", "MIXLORA", rank, prefetch_layers=9)
    cases["inputs need no gradient"] = compare("llama", "MIXLORA", rank, input_grads=False)
    if device == "cuda":  # symmetric memory and copy engines need GPUs
        cases["copy engine"] = compare("llama", "MIXLORA", rank, transport="copy_engine")
        cases["copy engine, compiled checkpointing"] = compare("qwen2", "MIXLORA", rank, checkpointing=True,
                                                                compiled=True, transport="copy_engine")
    report["call_orders"] = call_orders(rank)
    report["cast"] = cast_on_sharding(rank)
    report["gathered"] = gathered_outside_forward(rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    main(a.out_dir, a.device)
    from mixlora_ds import dist

    dist.shutdown()  # as launch/train.py leaves: together, skipping the interpreter's teardown
    dist.exit_now(0)
