"""Dispatch and combine: move (token, slot) pairs into expert order and back.

Shapes: T tokens, K slots per token, P = T*K pairs, E experts, F any feature size.
The local dispatcher sorts pairs by expert on the device, with no host synchronisation. An
expert-parallel dispatcher implements the same three methods with all-to-all exchanges, so the
expert maths never knows which one it runs under.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixlora_ds.model.router import Routing


@dataclass
class DispatchPlan:
    token_P: torch.Tensor
    """Token index of each pair, pairs sorted by expert (stable, so token order within an expert)."""
    unsort_P: torch.Tensor
    """Inverse permutation: pair ``t*K + k`` in token order sits at ``unsort_P[t*K + k]`` in expert order."""
    offs_E: torch.Tensor
    """int32 cumulative pair counts per expert (end offsets), as ``grouped_mm`` takes them."""
    weight_P: torch.Tensor
    """Combine weight of each pair in expert order (fp32)."""
    num_tokens: int
    top_k: int


class LocalDispatcher:
    """All experts live in this process."""

    def plan(self, routing: Routing) -> DispatchPlan:
        num_tokens, top_k = routing.expert_TK.shape
        expert_P = routing.expert_TK.reshape(-1)
        order_P = torch.argsort(expert_P, stable=True)
        unsort_P = torch.empty_like(order_P)
        unsort_P[order_P] = torch.arange(order_P.numel(), device=order_P.device)
        counts_E = torch.bincount(expert_P, minlength=routing.num_experts)
        return DispatchPlan(
            token_P=order_P // top_k,
            unsort_P=unsort_P,
            offs_E=counts_E.cumsum(0).to(torch.int32),
            weight_P=routing.weight_TK.reshape(-1)[order_P],
            num_tokens=num_tokens,
            top_k=top_k,
        )

    def dispatch(self, plan: DispatchPlan, x_TF: torch.Tensor) -> torch.Tensor:
        """Token rows -> one row per pair, in expert order."""
        return x_TF[plan.token_P]

    def combine(self, plan: DispatchPlan, y_PF: torch.Tensor) -> torch.Tensor:
        """Pair rows (expert order) -> per token, the weight-weighted sum over its slots.

        A gather plus a sum over K: deterministic, unlike a scatter-add.
        """
        weighted_PF = y_PF * plan.weight_P.to(y_PF.dtype).unsqueeze(-1)
        return weighted_PF[plan.unsort_P].view(plan.num_tokens, plan.top_k, -1).sum(dim=1)
