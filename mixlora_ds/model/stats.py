"""Routing statistics for monitoring and evaluation: per-layer expert load and router entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mixlora_ds.model.moe import moe_blocks


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


@torch.no_grad()
def routing_statistics(model: nn.Module, attention_mask: torch.Tensor | None = None) -> RoutingStatistics:
    """Statistics of the model's last forward, counting real tokens only."""
    blocks = [b for b in moe_blocks(model) if b.last_routing is not None]
    if not blocks:
        raise ValueError("no MixLoRA block has routed anything yet: run a forward pass first")
    counts, entropy, dropped = [], [], []
    for block in blocks:
        r = block.last_routing
        mask_T = (
            torch.ones(r.probs_TE.shape[0], device=r.probs_TE.device)
            if attention_mask is None else attention_mask.reshape(-1).float().to(r.probs_TE.device)
        )
        counts.append(mask_T @ r.selected_TE)
        ent_T = -(r.probs_TE * torch.log(r.probs_TE.clamp_min(1e-30))).sum(-1)
        entropy.append((mask_T * ent_T).sum() / mask_T.sum().clamp_min(1))
        dropped.append((mask_T * r.passthrough_T.float()).sum() if r.passthrough_T is not None else mask_T.new_zeros(()))
    counts_LE = torch.stack(counts)
    load_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)
    return RoutingStatistics(load_LE, torch.stack(entropy), mask_T.sum(), torch.stack(dropped), counts_LE)
