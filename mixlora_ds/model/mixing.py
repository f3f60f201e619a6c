"""Mixing a row's K expert slots into one output: the weighted sums of the W2 fold, written once.

Shapes: T rows, K slots per row, E experts (those this process holds), r LoRA rank, F any feature size.

Every folded path (the per-pair functions of ``pair_math.py`` with ``experts.folded_ffn``, and the
fused inference form of ``fused_ffn.py``) mixes the slots before the frozen down projection, which
is exact by linearity:
``sum_k w_k ((W2 + s B2_k A2_k) h_k + b2) = W2 (sum_k w_k h_k) + sum_k w_k s B2_k A2_k h_k + (sum_k w_k) b2``.
The masked-dense forms compute every expert's rank-r code for every row and keep, per slot, the code
of the slot's own expert (a one-hot mask), so no shape depends on the routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_onehot(expert_TK: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Which expert each slot chose, as a one-hot mask ``[T, K, E]`` in ``dtype``."""
    return F.one_hot(expert_TK, num_experts).to(dtype)


def keep_own_codes(code_T1xEr: torch.Tensor, onehot_TKE: torch.Tensor) -> torch.Tensor:
    """Every expert's codes of each row, ``[T, 1, ..., E, r]`` -> per slot, its own expert's only
    (the others zeroed), ``[T, K, ..., E, r]``."""
    T, K, E = onehot_TKE.shape
    between = (1,) * (code_T1xEr.dim() - 4)  # e.g. one axis per projection, broadcast alike
    return code_T1xEr * onehot_TKE.view(T, K, *between, E, 1)


def slot_weights(weight_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The routing weights as ``w_TK1`` (``[T, K, 1]``, in ``dtype``), which a block's mixes share:
    the router's gradient then sums over them in ``dtype``, before the cast back."""
    return weight_TK.to(dtype).unsqueeze(-1)


def mix_slots(y_TKF: torch.Tensor, w_TK1: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k y_k`` per row, ``[T, F]``: the slots' outputs weighted by their routing weights."""
    return (y_TKF * w_TK1).sum(dim=1)


def mix_own_codes(code_TKEr: torch.Tensor, onehot_TKE: torch.Tensor, w_TK1: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k code_k`` per row and expert, ``[T, E, r]``, each slot counting its own expert's code
    only: one GEMM of depth E*r with the experts' B matrices then gives the mixed output delta."""
    return (code_TKEr * (onehot_TKE * w_TK1).unsqueeze(-1)).sum(dim=1)


def add_folded_bias(y_TD: torch.Tensor, weight_TK: torch.Tensor, bias_D: torch.Tensor) -> torch.Tensor:
    """The fold applied W2's bias once; the experts' outputs weighted by w sum to (sum w) b."""
    return y_TD + (weight_TK.sum(-1, keepdim=True) - 1).to(y_TD.dtype) * bias_D
