"""Routers: which experts each token uses, with what weight.

Shapes: T tokens, D model dim, E experts, K expert slots per token.
All routing arithmetic runs in fp32, whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixlora_ds.config import MixLoraConfig


@dataclass
class Routing:
    expert_TK: torch.Tensor
    """Chosen expert per slot (long)."""
    weight_TK: torch.Tensor
    """Combine weight per slot (fp32); 0 for slots that carry no expert (top-p, dropped switch tokens)."""
    logits_TE: torch.Tensor
    """Router logits (fp32), for the z-loss."""
    probs_TE: torch.Tensor
    """Softmax over all experts (fp32), for the load-balance loss."""
    selected_TE: torch.Tensor
    """1.0 where the expert serves the token (fp32), for the load-balance loss and load statistics."""
    passthrough_T: torch.Tensor | None = None
    """Switch only: tokens over capacity, whose MoE output is their input."""

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]


class MixLoraRouter(nn.Module):
    """Bias-free linear gate ``[E, D]`` kept in fp32, plus the strategy that turns logits into routes."""

    def __init__(self, hidden_size: int, config: MixLoraConfig, device=None):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, device=device, dtype=torch.float32))
        with torch.no_grad():
            self.weight.normal_(0.0, config.router_init_range)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        strategy = self.config.routing_strategy
        if strategy == "mixlora":
            return top_k_routing(logits_TE, self.config.top_k)
        if strategy == "mixlora-dynamic":
            return top_p_routing(logits_TE, self.config.top_p, self.config.temperature, self.config.renormalize_top_p)
        capacity = self.config.expert_capacity if self.training else None
        return switch_routing(logits_TE, capacity, seq_len)


def top_k_routing(logits_TE: torch.Tensor, k: int) -> Routing:
    """Softmax over all experts, keep the top k, renormalise the kept weights to sum to 1."""
    probs_TE = logits_TE.softmax(dim=-1)
    weight_TK, expert_TK = probs_TE.topk(k, dim=-1)
    weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    selected_TE = torch.zeros_like(probs_TE).scatter_(1, expert_TK, 1.0)
    return Routing(expert_TK, weight_TK, logits_TE, probs_TE, selected_TE)


def top_p_routing(logits_TE: torch.Tensor, top_p: float, temperature: float, renormalize: bool) -> Routing:
    """Keep experts in decreasing probability up to and including the first whose cumulative
    probability exceeds ``top_p`` (MoE-PEFT's ``mixlora-dynamic`` selection).

    Deliberate fixes of the reference: the temperature divides the *logits* (the reference divides
    probabilities, which with any temperature > 0 selects every expert), and the kept weights are
    renormalised unless ``renormalize`` is False (the reference does not, so its output differs from
    the base model at initialisation).
    """
    if temperature > 0:
        logits_TE = logits_TE / temperature
    probs_TE = logits_TE.softmax(dim=-1)
    sorted_TE, expert_TE = probs_TE.sort(dim=-1, descending=True)
    mass_before_TE = sorted_TE.cumsum(dim=-1) - sorted_TE
    keep_TE = mass_before_TE < top_p
    keep_TE[:, 0] = True
    weight_TE = sorted_TE * keep_TE
    if renormalize:
        weight_TE = weight_TE / weight_TE.sum(dim=-1, keepdim=True)
    selected_TE = torch.zeros_like(probs_TE).scatter_(1, expert_TE, keep_TE.to(probs_TE.dtype))
    return Routing(expert_TE, weight_TE, logits_TE, probs_TE, selected_TE)


def switch_routing(logits_TE: torch.Tensor, capacity: int | None, seq_len: int | None) -> Routing:
    """Top-1 with the top probability as weight. In training each expert takes at most ``capacity``
    tokens per sequence (in token order); the rest pass through unchanged.

    Deliberate fix: the reference returns the input unchanged for *every* token at inference; here
    inference routes every token to its expert (no capacity limit).
    """
    probs_TE = logits_TE.softmax(dim=-1)
    weight_T1, expert_T1 = probs_TE.max(dim=-1, keepdim=True)
    selected_TE = torch.zeros_like(probs_TE).scatter_(1, expert_T1, 1.0)
    passthrough_T = None
    if capacity is not None:
        seq_len = seq_len or logits_TE.shape[0]
        per_seq_BSE = selected_TE.view(-1, seq_len, selected_TE.shape[-1])
        position_BSE = per_seq_BSE.cumsum(dim=1) * per_seq_BSE  # 1-based arrival order per expert
        kept_T = (position_BSE.amax(dim=-1) <= capacity).reshape(-1)
        passthrough_T = ~kept_T
        weight_T1 = weight_T1 * kept_T.unsqueeze(-1)
        selected_TE = selected_TE * kept_T.unsqueeze(-1)
    return Routing(expert_T1, weight_T1, logits_TE, probs_TE, selected_TE, passthrough_T)
