"""The inference form of a MixLoRA feed-forward block: frozen and LoRA weights fused into few GEMMs.

A decode step is a chain of small kernels, so what it costs is mostly how many there are. The
training paths (``experts.py``) run the router, the frozen projections and each projection's expert
A and B as separate GEMMs: ten per block against the base model's three. With frozen weights they
can be concatenated:

- input side: ``x @ [W1; W3; A1; A3]^T`` gives both frozen pre-activations and every expert's rank-r
  code of both projections in one GEMM; one batched GEMM then applies the (masked) B matrices;
- output side: ``[sum_k w_k h_k | sum_k w_k mask_k A2 h_k] @ [W2 | s B2^T]^T`` applies the frozen down
  projection to the weight-mixed intermediate (the W2 fold, ``mixing.py``) and every expert's B2 in
  one GEMM, after one GEMM for the A2 codes.

That is five GEMMs (router included) for the base model's three. The frozen weights are not copied:
the base ``nn.Linear`` weights become views into the fused matrices, so memory grows by the LoRA
weights only. ``MixLoraMoeBlock.train()`` gives the base layers standalone weights back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixlora_ds.model.dispatch import RoutedTokens
from mixlora_ds.model.experts import FFNShape
from mixlora_ds.model.mixing import (
    add_folded_bias,
    expert_onehot,
    keep_own_codes,
    mix_own_codes,
    mix_slots,
    slot_weights,
)
from mixlora_ds.model.pair_math import activate, run_compiled


class FusedExpertFFN(nn.Module):
    """Fused weights of one block (buffers in the activation dtype) and the forward that uses them.

    Build with ``fuse_block_weights``; the block calls it in eval mode after routing.
    """

    def __init__(self, W_in: torch.Tensor, b_in: torch.Tensor | None, dense_sizes: list[int], lora_inputs: list[int],
                 B_in: torch.Tensor | None, A_out: torch.Tensor | None, W_out: torch.Tensor,
                 b_out: torch.Tensor | None, rank: int, gated: bool, act):
        super().__init__()
        self.register_buffer("W_in", W_in, persistent=False)
        """``[sum(dense_sizes) + L*E*r, D]``: frozen input weights, then each LoRA input's A of all experts."""
        self.register_buffer("b_in", b_in, persistent=False)
        self.register_buffer("B_in", B_in, persistent=False)
        """``[L, E*r, F]``: pre-scaled B of the L input projections that carry experts."""
        self.register_buffer("A_out", A_out, persistent=False)
        """``[E*r, I]``: A of the output projection's experts (None: no output LoRA)."""
        self.register_buffer("W_out", W_out, persistent=False)
        """``[D, I (+ E*r)]``: frozen down weight, then the output experts' pre-scaled B, side by side."""
        self.register_buffer("b_out", b_out, persistent=False)
        self.dense_sizes = dense_sizes
        self.lora_inputs = lora_inputs
        self.rank = rank
        self.gated = gated
        self.act = act

    @property
    def dtype(self) -> torch.dtype:
        return self.W_in.dtype

    def forward(self, tokens: RoutedTokens, num_experts: int, compiled: bool = False) -> torch.Tensor:
        """The block's FFN output for routed tokens (experts numbered among those held here);
        ``compiled`` fuses the element-wise work with torch.compile (one graph shared by all blocks)."""
        args = (tokens.x_ND, tokens.expert_NK, tokens.weight_NK, num_experts, self.W_in, self.b_in, self.B_in,
                self.A_out, self.W_out, self.b_out, self.dense_sizes, self.lora_inputs, self.rank, self.gated, self.act)
        return run_compiled(fused_ffn_math, *args) if compiled else fused_ffn_math(*args)


def fused_ffn_math(x_TD, expert_TK, weight_TK, num_experts: int, W_in, b_in, B_in, A_out, W_out, b_out,
                   dense_sizes: list[int], lora_inputs: list[int], rank: int, gated: bool, act) -> torch.Tensor:
    """``FusedExpertFFN``'s computation as a pure function (what torch.compile traces)."""
    (T, K), E, r = expert_TK.shape, num_experts, rank
    onehot_TKE = expert_onehot(expert_TK, E, x_TD.dtype)
    w_TK1 = slot_weights(weight_TK, x_TD.dtype)
    both_TN = F.linear(x_TD, W_in, b_in)
    n_dense = sum(dense_sizes)
    pre = [d.unsqueeze(1) for d in both_TN[:, :n_dense].split(dense_sizes, dim=-1)]
    if lora_inputs:
        L = len(lora_inputs)
        code_TKLEr = keep_own_codes(both_TN[:, n_dense:].view(T, 1, L, E, r), onehot_TKE)
        delta_LPF = torch.bmm(code_TKLEr.reshape(T * K, L, E * r).transpose(0, 1), B_in)
        for j, i in enumerate(lora_inputs):
            pre[i] = pre[i] + delta_LPF[j].view(T, K, B_in.shape[-1])
    h_TKI = activate([p.expand(T, K, p.shape[-1]) for p in pre], gated, act)
    mixed_TI = mix_slots(h_TKI, w_TK1)
    if A_out is not None:
        code_TKEr = (h_TKI @ A_out.t()).view(T, K, E, r)
        mixed_code_TEr = mix_own_codes(code_TKEr, onehot_TKE, w_TK1)
        mixed_TI = torch.cat([mixed_TI, mixed_code_TEr.reshape(T, E * r)], dim=-1)
    y_TD = F.linear(mixed_TI, W_out, b_out)
    return y_TD if b_out is None else add_folded_bias(y_TD, weight_TK, b_out)


@torch.no_grad()
def fuse_block_weights(ffn: FFNShape, stacks: nn.ModuleDict, dtype: torch.dtype) -> FusedExpertFFN | None:
    """The fused form of one block's FFN for activations of ``dtype``, with the base projections'
    weights re-pointed into it; None without FFN experts, or when the frozen weights are not in
    ``dtype`` (they are shared, not copied, so they must already be)."""
    ins = [ffn.projection(n) for n in ffn.input_names]
    out = ffn.projection(ffn.output_name)
    if not stacks or any(p.weight.dtype != dtype for p in ins + [out]):
        return None
    loras = [stacks[n].prepared_weights(dtype) for n in ffn.input_names if n in stacks]
    lora_inputs = [i for i, n in enumerate(ffn.input_names) if n in stacks]
    dense_sizes = [p.out_features for p in ins]
    code_width = loras[0][0].shape[0] if loras else 0
    W_in = torch.cat([p.weight for p in ins] + [A for A, _ in loras])
    b_in = None
    if any(p.bias is not None for p in ins):
        b_in = torch.cat([p.bias if p.bias is not None else W_in.new_zeros(p.out_features) for p in ins]
                         + [W_in.new_zeros(code_width * len(loras))])
    B_in = torch.stack([B for _, B in loras]) if loras else None
    A_out = None
    W_out = out.weight.detach()
    if ffn.output_name in stacks:
        A_out, B_out = stacks[ffn.output_name].prepared_weights(dtype)
        W_out = torch.cat([out.weight, B_out.t()], dim=1)
    rank = next(iter(stacks.values())).settings.r
    fused = FusedExpertFFN(W_in, b_in, dense_sizes, lora_inputs, B_in, A_out, W_out,
                           None if out.bias is None else out.bias.detach(), rank, ffn.gated, ffn.act)
    # The base layers now read their weights from the fused matrices: no second copy of the FFN.
    start = 0
    for p in ins:
        p.weight.data = fused.W_in[start : start + p.out_features]
        if p.bias is not None:
            p.bias.data = fused.b_in[start : start + p.out_features]
        start += p.out_features
    out.weight.data = fused.W_out[:, : out.in_features]
    return fused


@torch.no_grad()
def unshare_base_weights(ffn: FFNShape) -> None:
    """Give the base projections standalone contiguous weights again (before training)."""
    for name in ffn.input_names + (ffn.output_name,):
        for p in ffn.projection(name).parameters(recurse=False):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
