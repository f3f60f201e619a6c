"""The "fused" expert-compute path: the per-pair part of a gated FFN as one custom op
(``kernels/pair_op.py``: low-rank GEMMs plus one element-wise pass each way, in Triton on GPU),
plugged into ``experts.folded_ffn`` (frozen projections, W2 fold) like the per-pair functions of
``pair_math.py``.

It runs wherever PyTorch does (the element-wise passes fall back to PyTorch on CPU, for float64 and
without Triton); an FFN it does not cover falls back to the masked-dense path, the oracle in tests.
"""

from __future__ import annotations

import torch.nn as nn

from mixlora_ds.model.experts import FFNShape
from mixlora_ds.model.kernels import pair_op

KERNEL_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
"""Hugging Face activation names the passes implement -> their name for them."""


def fused_unsupported_reason(ffn: FFNShape, stacks: nn.ModuleDict, act_fn: str) -> str | None:
    """Why the fused path cannot run this block, or None when it can."""
    if not ffn.gated or len(ffn.input_names) != 2:
        return "it covers gated FFNs with separate gate and up projections only"
    if act_fn not in KERNEL_ACTIVATIONS:
        return f"activation {act_fn!r} is not one of {sorted(KERNEL_ACTIVATIONS)}"
    if not stacks:
        return "the block has no expert LoRA"
    if any(s.lora_magnitude_vector is not None for s in stacks.values()):
        return "DoRA experts need the loop path"
    return None


def fused_pair_math_for(act_fn: str):
    """The op as a ``pair_math.PairMath`` for blocks whose activation is ``act_fn``."""
    kernel_act = KERNEL_ACTIVATIONS[act_fn]

    def fused_pair_math(x_TD, expert_TK, weight_TK, pre_dense, in_loras, out_lora, gated, act, num_experts):
        return pair_op.fused_pair_math(x_TD, expert_TK, weight_TK, list(pre_dense), in_loras, out_lora, gated,
                                       kernel_act, num_experts=num_experts)

    return fused_pair_math
