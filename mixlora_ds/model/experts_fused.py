"""The "fused" expert-compute path: the per-pair part of a gated FFN in Triton kernels
(``kernels/pair_op.py``), the frozen projections and the W2 fold as in ``experts.ffn_dense``.

Triton is optional: without it (or on CPU tensors, or for an FFN the kernels do not cover) the block
falls back to the masked-dense path, which stays the oracle in tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mixlora_ds.model.experts import FFNShape, _finish
from mixlora_ds.model.router import Routing

try:  # imported here, not at first use, so compiled decoder layers never trace an import
    from mixlora_ds.model.kernels import pair_op, triton_pair
except ImportError:  # no triton: the block uses the dense path
    pair_op = triton_pair = None

KERNEL_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
"""Hugging Face activation names the kernels implement -> the kernels' name for them."""

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernels_importable() -> bool:
    return pair_op is not None


def _runs_here(x_TD: torch.Tensor) -> bool:
    return x_TD.is_cuda or triton_pair.INTERPRETED  # CPU tensors only under Triton's interpreter (tests)


def fused_unsupported_reason(ffn: FFNShape, stacks: nn.ModuleDict, act_fn: str, x_TD: torch.Tensor) -> str | None:
    """Why the fused path cannot run this block on this input, or None when it can."""
    if not ffn.gated or len(ffn.input_names) != 2:
        return "the kernels cover gated FFNs with separate gate and up projections only"
    if act_fn not in KERNEL_ACTIVATIONS:
        return f"activation {act_fn!r} is not one of {sorted(KERNEL_ACTIVATIONS)}"
    if not stacks:
        return "the block has no expert LoRA"
    if any(s.lora_magnitude_vector is not None for s in stacks.values()):
        return "DoRA experts need the loop path"
    if x_TD.dtype not in KERNEL_DTYPES:
        return f"activations of dtype {x_TD.dtype} (the kernels take bf16, fp16 or fp32)"
    if not kernels_importable():
        return "triton is not installed"
    if not _runs_here(x_TD):
        return "the kernels need CUDA tensors"
    return None


def ffn_fused(ffn: FFNShape, stacks: nn.ModuleDict, x_TD: torch.Tensor, routing: Routing, act_fn: str) -> torch.Tensor:
    """Same function as ``experts.ffn_dense``; the custom op recomputes its per-pair intermediates in
    its backward, so no activation checkpoint is needed around it."""
    pre_dense = [ffn.projection(n)(x_TD) for n in ffn.input_names]
    in_loras = [stacks[n].stacked(x_TD.dtype) if n in stacks else None for n in ffn.input_names]
    out_lora = stacks[ffn.output_name].stacked(x_TD.dtype) if ffn.output_name in stacks else None

    def per_pair(x_TD: torch.Tensor, *pre_dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return pair_op.fused_pair_math(x_TD, routing.expert_TK, routing.weight_TK, list(pre_dense), in_loras, out_lora,
                               ffn.gated, KERNEL_ACTIVATIONS[act_fn], num_experts=routing.num_experts)

    return _finish(ffn, stacks, x_TD, routing, per_pair, pre_dense, recompute=False)
