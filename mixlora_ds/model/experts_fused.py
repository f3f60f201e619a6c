"""The "fused" expert-compute path: the per-pair part of a gated FFN in Triton kernels
(``kernels/pair_op.py``), plugged into ``experts.folded_ffn`` (frozen projections, W2 fold) like the
per-pair functions of ``pair_math.py``.

Triton is optional: without it (or on CPU tensors, or for an FFN the kernels do not cover) the block
falls back to the masked-dense path, which stays the oracle in tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mixlora_ds.model.experts import FFNShape

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


def fused_pair_math_for(act_fn: str):
    """The kernels as a ``pair_math.PairMath`` for blocks whose activation is ``act_fn``."""
    kernel_act = KERNEL_ACTIVATIONS[act_fn]

    def fused_pair_math(x_TD, expert_TK, weight_TK, pre_dense, in_loras, out_lora, gated, act, num_experts):
        return pair_op.fused_pair_math(x_TD, expert_TK, weight_TK, list(pre_dense), in_loras, out_lora, gated,
                                       kernel_act, num_experts=num_experts)

    return fused_pair_math
