"""(token, slot) pairs sorted by expert, and back: what the grouped expert path runs on.

Shapes: T tokens, K slots per token, P = T*K pairs, E experts, F any feature size.
The sort runs on the device, with no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixlora_ds.model.mixing import mix_slots


@dataclass
class PairOrder:
    token_P: torch.Tensor
    """Token index of each pair, pairs sorted by expert (stable, so token order within an expert)."""
    unsort_P: torch.Tensor
    """Inverse permutation: pair ``t*K + k`` in token order sits at ``unsort_P[t*K + k]`` in expert order."""
    offs_E: torch.Tensor
    """int32 cumulative pair counts per expert (end offsets), as ``grouped_mm`` takes them."""
    weight_TK1: torch.Tensor
    """Combine weight of each pair, in token order, as ``mixing.mix_slots`` takes it (fp32)."""
    num_tokens: int
    top_k: int


def sort_pairs_by_expert(expert_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int) -> PairOrder:
    num_tokens, top_k = expert_TK.shape
    expert_P = expert_TK.reshape(-1)
    order_P = torch.argsort(expert_P, stable=True)
    unsort_P = torch.empty_like(order_P)
    unsort_P[order_P] = torch.arange(order_P.numel(), device=order_P.device)
    counts_E = torch.bincount(expert_P, minlength=num_experts)
    return PairOrder(
        token_P=order_P // top_k,
        unsort_P=unsort_P,
        offs_E=counts_E.cumsum(0).to(torch.int32),
        weight_TK1=weight_TK.unsqueeze(-1),
        num_tokens=num_tokens,
        top_k=top_k,
    )


def gather_pairs(order: PairOrder, x_TF: torch.Tensor) -> torch.Tensor:
    """Token rows -> one row per pair, in expert order."""
    return x_TF[order.token_P]


def mix_pairs(order: PairOrder, y_PF: torch.Tensor) -> torch.Tensor:
    """Pair rows (expert order) -> per token, the weighted sum over its slots.

    A gather back to token order plus a sum over K: deterministic, unlike a scatter-add.
    """
    y_TKF = y_PF[order.unsort_P].view(order.num_tokens, order.top_k, y_PF.shape[-1])
    return mix_slots(y_TKF, order.weight_TK1.to(y_PF.dtype))
