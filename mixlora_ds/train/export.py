"""Export the trained adapter in the reference format, from the trainable shards only.

Every rank takes part (gathering is a collective); rank 0 writes. The base model is never gathered.
Before the export counts as done, rank 0 reads the files back and checks that they are non-empty,
finite, equal to what was trained, and that they map onto every trainable parameter of a fresh
model skeleton of the same architecture (built on the meta device, so this costs no memory even
for a 7B model). Empty ZeRO-3 adapter saves are a common failure of other tools; here a failed
check raises and the directory is left as it was.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn

from mixlora_ds import dist

log = logging.getLogger("mixlora_ds.train")


class ExportError(RuntimeError):
    pass


def gather_trainable_fp32(model: nn.Module, expert_parallel=None) -> dict[str, torch.Tensor]:
    """Full fp32 values of the trainable parameters, on rank 0 (others get an empty dict).

    Collective: call on every rank. Under ZeRO-1/2/3 with bf16 this is the optimizer's fp32 master
    copy, not the bf16 compute copy. Under expert parallelism (``expert_parallel``) the experts of
    every rank are gathered, in expert order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    from mixlora_ds.model.experts import is_expert_param
    from mixlora_ds.model.partitioned import gathered

    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if expert_parallel is not None and is_expert_param(p):
            full = expert_parallel.gather_experts(p.detach().float())  # fp32 masters, kept by their owners
            if dist.is_main():
                out[name] = full.to("cpu").clone()
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:  # stage 0, or no optimizer yet: the parameter itself is the master copy
            with gathered([p]):
                full = p.detach().clone()
        if dist.is_main():
            out[name] = full.detach().to("cpu", torch.float32).clone()
    return out


def export_adapter(model: nn.Module, adapter_config: Any, hf_config: Any, out_dir: str,
                   expert_parallel=None) -> dict[str, int] | None:
    """Collective. Writes ``out_dir`` atomically on rank 0 and verifies it; returns counts on rank 0."""
    from mixlora_ds.adapter_io import to_reference_state_dict, write_adapter

    named = gather_trainable_fp32(model, expert_parallel)
    result = None
    error: str | None = None
    if dist.is_main():
        try:
            weights = to_reference_state_dict(_strip_wrapper(named), adapter_config)
            write_adapter(out_dir, adapter_config, weights)
            result = verify_adapter(out_dir, weights, hf_config)
        except Exception as e:  # reported on every rank below, so no rank waits forever
            error = f"{type(e).__name__}: {e}"
    error = dist.broadcast_object(error)
    if error:
        raise ExportError(f"adapter export to {out_dir} failed: {error}")
    return result


def _strip_wrapper(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n[len("module."):] if n.startswith("module.") else n: t for n, t in named.items()}


def verify_adapter(out_dir: str, expected: dict[str, torch.Tensor], hf_config: Any) -> dict[str, int]:
    """Read an exported adapter back and prove it complete; raises ``ExportError`` otherwise."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mixlora_ds.adapter_io import BIN_NAME, SAFETENSORS_NAME, from_reference_state_dict, read_adapter_config
    from mixlora_ds.model.inject import inject_mixlora

    config = read_adapter_config(out_dir)
    files = {
        SAFETENSORS_NAME: load_file(os.path.join(out_dir, SAFETENSORS_NAME)),
        BIN_NAME: torch.load(os.path.join(out_dir, BIN_NAME), map_location="cpu", weights_only=True),
    }
    for fname, weights in files.items():
        where = os.path.join(out_dir, fname)
        if not weights:
            raise ExportError(f"{where}: no tensors")
        if set(weights) != set(expected):
            diff = sorted(set(weights) ^ set(expected))
            raise ExportError(f"{where}: key set differs from the trained adapter: {diff[:5]}")
        for key, t in weights.items():
            if t.numel() == 0:
                raise ExportError(f"{where}: tensor {key} is empty (a ZeRO-3 placeholder was saved)")
            if not torch.isfinite(t).all():
                raise ExportError(f"{where}: tensor {key} has non-finite values")
            if not torch.equal(t, expected[key]):
                raise ExportError(f"{where}: tensor {key} differs from the trained value")
    # Every trainable parameter of a fresh model must receive a tensor of the right shape.
    from mixlora_ds.train.base_model import plain_construction

    with plain_construction(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
        inject_mixlora(skeleton, config)
    mapped = from_reference_state_dict(files[SAFETENSORS_NAME], skeleton, source=out_dir)
    numel = sum(t.numel() for t in files[SAFETENSORS_NAME].values())
    log.info("verified %s: %d tensors map onto %d adapter parameters", out_dir, len(files[SAFETENSORS_NAME]), len(mapped))
    return {"tensors": len(files[SAFETENSORS_NAME]), "parameters": numel}
