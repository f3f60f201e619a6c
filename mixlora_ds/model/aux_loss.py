"""Router losses, computed from the routing each MixLoRA block kept during the last forward.

Load balance (MoE-PEFT's Mixtral variant): rows of all layers are pooled first, then
``coef * E * sum_e F_e * P_e`` where ``F_e`` is the fraction of (token, layer) rows that send a slot to
expert e and ``P_e`` the mean router probability of e; padding rows are excluded. With top-k
membership, a perfectly balanced router gives ``coef * K``.

Deliberate fixes of the reference: the top-p and switch variants mask padding too (the reference
does not), and so does the switch z-loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mixlora_ds.model.moe import moe_blocks
from mixlora_ds.model.router import Routing


def _row_mask(routing: Routing, attention_mask: torch.Tensor | None) -> torch.Tensor:
    n = routing.probs_TE.shape[0]
    if attention_mask is None:
        return routing.probs_TE.new_ones(n)
    mask = attention_mask.reshape(-1).to(routing.probs_TE.dtype)
    if mask.numel() != n:
        raise ValueError(f"attention_mask has {mask.numel()} positions but the router saw {n} tokens")
    return mask


def load_balance_loss(routings: list[Routing], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``E * sum_e F_e * P_e`` over the pooled rows of all layers (without the coefficient)."""
    selected = torch.zeros_like(routings[0].probs_TE[0])
    probs = torch.zeros_like(selected)
    rows = selected.new_zeros(())
    for routing in routings:
        mask_T = _row_mask(routing, attention_mask)
        selected = selected + mask_T @ routing.selected_TE
        probs = probs + mask_T @ routing.probs_TE
        rows = rows + mask_T.sum()
    rows = rows.clamp_min(1.0)
    return routings[0].num_experts * torch.sum((selected / rows) * (probs / rows))


def router_z_loss(routings: list[Routing], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real rows of ``logsumexp(logits)^2``, pooled over layers."""
    total = routings[0].logits_TE.new_zeros(())
    rows = total.new_zeros(())
    for routing in routings:
        mask_T = _row_mask(routing, attention_mask)
        total = total + (mask_T * torch.logsumexp(routing.logits_TE, dim=-1).square()).sum()
        rows = rows + mask_T.sum()
    return total / rows.clamp_min(1.0)


def mixlora_aux_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The router loss to add to the training loss for the model's last forward, coefficients applied.

    Zero (a 0-dim tensor) for a model without MixLoRA blocks or with ``router_loss`` off.
    """
    blocks = [b for b in moe_blocks(model) if b.last_routing is not None]
    if not blocks or not blocks[0].config.router_loss:
        return torch.zeros((), device=_device_of(model))
    config = blocks[0].config
    routings = [b.last_routing for b in blocks]
    loss = config.router_aux_loss_coef * load_balance_loss(routings, attention_mask)
    if config.routing_strategy == "mixlora-switch":
        loss = loss + config.router_z_loss_coef * router_z_loss(routings, attention_mask)
    return loss


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
