"""Routing statistics for monitoring and evaluation: per-layer expert load and router entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mixlora_ds.model.aux_loss import row_mask, side_by_side
from mixlora_ds.model.moe import moe_blocks
from mixlora_ds.model.router import Routing


@dataclass
class RoutingStatistics:
    load_LE: torch.Tensor
    """Share of the routed (token, slot) assignments each expert received, per layer (rows sum to 1)."""
    entropy_L: torch.Tensor
    """Mean router entropy (nats) over real tokens, per layer."""
    tokens: torch.Tensor
    """Real tokens counted (one number, the same for every layer)."""
    dropped_L: torch.Tensor
    """Tokens that passed through unrouted (switch over capacity), per layer."""
    counts_LE: torch.Tensor
    """Raw assignment counts per layer and expert, for summing across batches or ranks."""


def routing_statistics(model: nn.Module, attention_mask: torch.Tensor | None = None) -> RoutingStatistics:
    """Statistics of the model's last forward, counting real tokens only."""
    routings = [b.last_routing for b in moe_blocks(model) if b.last_routing is not None]
    if not routings:
        raise ValueError("no MixLoRA block has routed anything yet: run a forward pass first")
    return statistics_of(routings, attention_mask)


@torch.no_grad()
def statistics_of(routings: list[Routing], attention_mask: torch.Tensor | None = None) -> RoutingStatistics:
    """``routing_statistics`` of these routings, one per layer (all layers at once: ``side_by_side``)."""
    mask_T = row_mask(routings, attention_mask)
    counts_LE = mask_T @ side_by_side(routings, "selected_TE")
    probs_LTE = side_by_side(routings, "probs_TE")
    entropy_LT = -(probs_LTE * torch.log(probs_LTE.clamp_min(1e-30))).sum(-1)
    real = mask_T.sum()
    entropy_L = (entropy_LT @ mask_T) / real.clamp_min(1)
    if routings[0].passthrough_T is not None:
        dropped_L = side_by_side(routings, "passthrough_T").to(mask_T.dtype) @ mask_T
    else:
        dropped_L = mask_T.new_zeros(len(routings))
    load_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)
    return RoutingStatistics(load_LE, entropy_L, real, dropped_L, counts_LE)
