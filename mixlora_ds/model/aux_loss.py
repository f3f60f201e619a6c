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


def row_mask(routings: list[Routing], attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[T]``: 1 for the real rows every layer routed, 0 for padding."""
    probs_TE = routings[0].probs_TE
    n = probs_TE.shape[0]
    if attention_mask is None:
        return probs_TE.new_ones(n)
    mask = attention_mask.reshape(-1).to(device=probs_TE.device, dtype=probs_TE.dtype)
    if mask.numel() != n:
        raise ValueError(f"attention_mask has {mask.numel()} positions but the router saw {n} tokens")
    return mask


def side_by_side(routings: list[Routing], name: str) -> torch.Tensor:
    """One field of every layer's routing, ``[L, T, ...]``: the layers' sums then take one operator
    each, not one per layer (what the host dispatches is what these small tensors cost)."""
    return torch.stack([getattr(r, name) for r in routings])


def load_balance_loss(routings: list[Routing], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``E * sum_e F_e * P_e`` over the pooled rows of all layers (without the coefficient)."""
    mask_T = row_mask(routings, attention_mask)
    selected_E = (mask_T @ side_by_side(routings, "selected_TE")).sum(0)  # [T] @ [L, T, E] -> [L, E]
    probs_E = (mask_T @ side_by_side(routings, "probs_TE")).sum(0)
    rows = (mask_T.sum() * len(routings)).clamp_min(1.0)
    return routings[0].num_experts * torch.sum((selected_E / rows) * (probs_E / rows))


def router_z_loss(routings: list[Routing], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real rows of ``logsumexp(logits)^2``, pooled over layers."""
    mask_T = row_mask(routings, attention_mask)
    z_LT = torch.logsumexp(side_by_side(routings, "logits_TE"), dim=-1).square()
    return (z_LT @ mask_T).sum() / (mask_T.sum() * len(routings)).clamp_min(1.0)


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
