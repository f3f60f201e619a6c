"""Dispatch and combine: bring each token to the experts that serve it, and its output back.

The MoE block runs route -> dispatch -> expert compute -> combine. A dispatcher takes the token
rows and their routes, hands expert compute the rows that the experts of this process serve
(``RoutedTokens``), and turns what expert compute returns into one output row per token:

- ``LocalDispatcher``: every expert lives in this process; both steps hand the rows through.
- ``mixlora_ds.parallel.expert_parallel.AllToAllDispatcher``: experts are spread over the ranks of
  an expert-parallel group; tokens travel by all-to-all. The trainer installs it on the blocks.

Expert compute sees only ``RoutedTokens`` and never knows which dispatcher it runs under.
Shapes: T tokens, N rows handed to expert compute, K slots per token, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mixlora_ds.model.router import Routing


@dataclass
class RoutedTokens:
    """What expert compute works on: rows and, per slot, a local expert and its weight."""

    x_ND: torch.Tensor
    expert_NK: torch.Tensor
    """Expert of each slot, numbered among the experts this process holds (long). A slot with weight
    0 (served elsewhere, or no expert at all) holds any valid number and contributes nothing."""
    weight_NK: torch.Tensor
    """Combine weight of each slot (fp32)."""


class TokenDispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[RoutedTokens, Any]:
        """Rows and routes for expert compute, plus a handle for ``combine``."""

    def combine(self, y_ND: torch.Tensor, handle: Any) -> torch.Tensor:
        """Expert outputs (each already the weighted sum over its slots) -> one row per token."""


class LocalDispatcher:
    """All experts live in this process."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[RoutedTokens, None]:
        return RoutedTokens(x_TD, routing.expert_TK, routing.weight_TK), None

    def combine(self, y_ND: torch.Tensor, handle: None) -> torch.Tensor:
        return y_ND
