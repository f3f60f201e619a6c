"""Expert LoRAs, and expert compute: the experts this process holds, applied to routed tokens.

Shapes: N rows, K slots per row, P (row, slot) pairs, D model dim, I FFN intermediate dim, E experts
(those this process holds), r LoRA rank. Expert ``e`` of a projection with frozen weight W computes
``W x + s * B_e A_e dropout(x)``.

Every expert-compute path takes ``RoutedTokens`` (rows, local expert ids, weights) and returns, per
row, the weighted sum of its experts' outputs:

- ``ffn_loop``: the plain per-expert loop of the paper and the reference, kept as the readable
  reference the tests compare against (and the path for DoRA experts).
- ``folded_ffn`` with a per-pair function of ``pair_math.py`` (masked-dense, grouped, or a fused GPU
  kernel) shares the frozen work: ``W1 x`` / ``W3 x`` run once per row, and the frozen down
  projection runs once per row on the weight-mixed intermediates, exact by linearity:
  ``sum_e w_e (W2 + s B2_e A2_e) h_e = W2 (sum_e w_e h_e) + sum_e w_e s B2_e A2_e h_e``.
  The per-pair functions return the mixed intermediate and the mixed output-LoRA delta; the frozen
  W2 and its bias correction are applied here. The per-pair part is recomputed in backward, so
  activation memory stays near plain LoRA.
- the fused inference form (``fused_ffn.py``) for frozen adapters.

The fold's mixing and bias correction are ``mixing.py``'s, shared by the folded paths and the fused
form; DoRA's rescaling is ``dora.py``'s, shared with ``LoraLinear``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mixlora_ds.config import LoraSettings
from mixlora_ds.model import dora
from mixlora_ds.model.dispatch import RoutedTokens
from mixlora_ds.model.lora import cached_for_inference, init_lora_A_
from mixlora_ds.model.mixing import add_folded_bias
from mixlora_ds.model.pair_math import PairMath, activate, run_compiled

EXPERT_ATTR = "mixlora_expert"
"""Set (True) on every expert parameter: expert parallelism shards, reduces, clips and checkpoints
parameters by this tag, never by name patterns."""


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, EXPERT_ATTR, False)


class ExpertLoraStack(nn.Module):
    """The LoRA pairs of all experts on one frozen projection, stored as two stacked tensors."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, settings: LoraSettings,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.settings = settings
        self.scaling = settings.scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, settings.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, settings.r, device=device, dtype=dtype))
        init_lora_A_(self.lora_A, settings)
        self.dropout = nn.Dropout(settings.lora_dropout) if settings.lora_dropout > 0 else nn.Identity()
        # DoRA magnitudes, one vector per expert; set by ``init_dora`` once the base weight is known.
        self.lora_magnitude_vector = (
            nn.Parameter(torch.ones(num_experts, out_features, device=device, dtype=dtype))
            if settings.use_dora else None
        )
        for p in self.parameters():
            setattr(p, EXPERT_ATTR, True)

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @torch.no_grad()
    def keep_experts(self, first: int, count: int) -> None:
        """Hold only experts ``first .. first+count-1`` (expert parallelism: the others live on other
        ranks); they are then numbered 0 .. count-1 here."""
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            p = getattr(self, name)
            if p is not None:
                kept = nn.Parameter(p[first:first + count].clone(), requires_grad=p.requires_grad)
                setattr(kept, EXPERT_ATTR, True)
                setattr(self, name, kept)
        self.__dict__.pop("_inference_cache", None)

    def stacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """All experts side by side for ``dense_pair_math``: A as ``[E*r, in]``, B as ``[E*r, out]``
        with the LoRA scaling folded in (scaling the small weight saves a pass over activations),
        and the dropout probability (0 outside training). Cached for a frozen adapter
        (``cached_for_inference``)."""
        p = self.settings.lora_dropout if self.training else 0.0
        return (*cached_for_inference(self, (self.lora_A, self.lora_B), dtype, lambda: self.prepared_weights(dtype)), p)

    def prepared_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A as ``[E*r, in]`` and the pre-scaled B as ``[E*r, out]``, in ``dtype`` (uncached)."""
        E, r, _ = self.lora_A.shape
        A = self.lora_A.to(dtype).reshape(E * r, -1)
        B = (self.lora_B.to(dtype).transpose(1, 2).reshape(E * r, -1) * self.scaling).contiguous()
        return A, B

    def expert_delta(self, e: int, x_NK: torch.Tensor) -> torch.Tensor:
        """``s B_e A_e dropout(x)`` for rows that all go to expert ``e``."""
        a = self.dropout(x_NK.to(self.lora_A.dtype))
        return ((a @ self.lora_A[e].t()) @ self.lora_B[e].t() * self.scaling).to(x_NK.dtype)

    @torch.no_grad()
    def init_dora(self, base: nn.Linear) -> None:
        """Start every expert's magnitudes at its adapted weight's row norms (``dora.py``)."""
        for e in range(self.num_experts):
            magnitude = dora.initial_magnitude(base.weight, self.lora_A[e], self.lora_B[e], self.scaling)
            self.lora_magnitude_vector[e].copy_(magnitude)

    def apply_expert(self, e: int, base: nn.Linear, x_NK: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` of this projection, frozen part included (the loop path)."""
        base_NO, delta_NO = base(x_NK), self.expert_delta(e, x_NK)
        if self.lora_magnitude_vector is None:
            return base_NO + delta_NO
        # W is whole here, as in every forward (``partitioned.py``).
        norm = dora.weight_norm(base.weight, self.lora_A[e], self.lora_B[e], self.scaling)
        return dora.rescaled_output(base_NO, delta_NO, self.lora_magnitude_vector[e], norm, base.bias, x_NK.dtype)


class FFNShape:
    """How the frozen FFN's projections fit together (see ``families.FamilySpec``)."""

    def __init__(self, base_mlp: nn.Module, input_names: tuple[str, ...], output_name: str, gated: bool,
                 act: Callable[[torch.Tensor], torch.Tensor]):
        self.base_mlp = base_mlp
        self.input_names = input_names
        self.output_name = output_name
        self.gated = gated
        self.act = act

    def projection(self, name: str) -> nn.Linear:
        return getattr(self.base_mlp, name)

    def activate(self, pre: list[torch.Tensor]) -> torch.Tensor:
        return activate(pre, self.gated, self.act)


def ffn_loop(ffn: FFNShape, stacks: nn.ModuleDict, tokens: RoutedTokens, num_experts: int) -> torch.Tensor:
    """Reference path: every expert runs the whole FFN (frozen weights + its LoRAs) on its rows."""
    x_ND, expert_NK, weight_NK = tokens.x_ND, tokens.expert_NK, tokens.weight_NK
    acc = torch.promote_types(x_ND.dtype, torch.float32)  # fp32 sums for 16-bit inputs, float64 kept
    out_ND = torch.zeros(x_ND.shape, dtype=acc, device=x_ND.device)
    for e in range(num_experts):
        row_M, slot_M = torch.nonzero((expert_NK == e) & (weight_NK != 0), as_tuple=True)
        x_MD = x_ND[row_M]
        pre = [_apply(ffn.projection(n), stacks, n, e, x_MD) for n in ffn.input_names]
        h_MI = ffn.activate(pre)
        y_MD = _apply(ffn.projection(ffn.output_name), stacks, ffn.output_name, e, h_MI)
        out_ND.index_add_(0, row_M, y_MD.to(acc) * weight_NK[row_M, slot_M].unsqueeze(-1).to(acc))
    return out_ND.to(x_ND.dtype)


def _apply(base: nn.Linear, stacks: nn.ModuleDict, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    return stacks[name].apply_expert(e, base, x) if name in stacks else base(x)


def folded_ffn(ffn: FFNShape, stacks: nn.ModuleDict, tokens: RoutedTokens, num_experts: int, pair_math: PairMath,
               recompute: bool = True, compiled: bool = False) -> torch.Tensor:
    """Shared frozen work once per row, the per-pair part from ``pair_math`` (recomputed in backward
    when training; through one shared torch.compile graph when ``compiled``), then the W2 fold."""
    x_ND = tokens.x_ND
    pre_dense = [ffn.projection(n)(x_ND) for n in ffn.input_names]  # W1 x, W3 x: once per row
    in_loras = [stacks[n].stacked(x_ND.dtype) if n in stacks else None for n in ffn.input_names]
    out_lora = stacks[ffn.output_name].stacked(x_ND.dtype) if ffn.output_name in stacks else None
    statics = (in_loras, out_lora, ffn.gated, ffn.act, num_experts)

    def per_pair(x_ND: torch.Tensor, *pre_dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = (x_ND, tokens.expert_NK, tokens.weight_NK, list(pre_dense), *statics)
        return run_compiled(pair_math, *args) if compiled else pair_math(*args)

    if recompute and torch.is_grad_enabled():
        parts = checkpoint(per_pair, x_ND, *pre_dense, use_reentrant=False)
    else:
        parts = per_pair(x_ND, *pre_dense)
    out_proj = ffn.projection(ffn.output_name)
    y_ND = out_proj(parts[0])  # frozen W2 once per row on the mixed intermediates
    if len(parts) > 1:
        y_ND = y_ND + parts[1]
    if out_proj.bias is not None:
        y_ND = add_folded_bias(y_ND, tokens.weight_NK, out_proj.bias.detach())
    return y_ND
