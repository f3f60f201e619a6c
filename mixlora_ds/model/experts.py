"""Expert LoRAs and the three ways to compute a MixLoRA feed-forward block.

Shapes: T tokens, K slots per token, P (token, slot) pairs in expert order, D model dim,
I FFN intermediate dim, E experts, r LoRA rank. Expert ``e`` of a projection with frozen weight W
computes ``W x + s * B_e A_e dropout(x)``.

- ``ffn_loop``: the plain per-expert loop of the paper and the reference, kept as the readable
  reference the tests compare against (and the path for DoRA experts).
- ``ffn_dense`` (default) and ``ffn_grouped`` share the frozen work: ``W1 x`` / ``W3 x`` run once per
  token, and the frozen down projection runs once per token on the weight-mixed intermediates,
  which is exact by linearity:
  ``sum_e w_e (W2 + s B2_e A2_e) h_e = W2 (sum_e w_e h_e) + sum_e w_e s B2_e A2_e h_e``.
  They differ in the low-rank work: ``grouped`` sorts pairs by expert and runs one grouped matmul
  per projection; ``dense`` keeps pairs in token order and runs masked GEMMs over all experts.
  Both recompute the per-pair intermediates in backward, so activation memory stays near plain LoRA.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mixlora_ds.config import LoraSettings
from mixlora_ds.model.dispatch import LocalDispatcher
from mixlora_ds.model.grouped_mm import grouped_mm
from mixlora_ds.model.lora import cached_for_inference, init_lora_A_
from mixlora_ds.model.router import Routing
from mixlora_ds.zero import gathered


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
    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def grouped_delta(self, x_PK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """``s B_e A_e dropout(x)`` for every pair, rows in expert order.

        Computed in the activation dtype: the small weights are cast, not the large activations.
        """
        A, B = self.lora_A.to(x_PK.dtype), self.lora_B.to(x_PK.dtype)
        low_Pr = grouped_mm(self.dropout(x_PK), A.transpose(1, 2), offs_E)
        return grouped_mm(low_Pr, B.transpose(1, 2), offs_E) * self.scaling

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

    def weight_norm(self, e: int, base: nn.Linear) -> torch.Tensor:
        with gathered([base.weight]):
            w = base.weight.to(self.lora_A.dtype) + self.scaling * (self.lora_B[e] @ self.lora_A[e])
            return torch.linalg.vector_norm(w, dim=1)

    @torch.no_grad()
    def init_dora(self, base: nn.Linear) -> None:
        for e in range(self.num_experts):
            self.lora_magnitude_vector[e].copy_(self.weight_norm(e, base))

    def apply_expert(self, e: int, base: nn.Linear, x_NK: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` of this projection, frozen part included (the loop path)."""
        out = base(x_NK) + self.expert_delta(e, x_NK)
        if self.lora_magnitude_vector is None:
            return out
        scale = self.lora_magnitude_vector[e] / self.weight_norm(e, base).detach()
        bias = base.bias
        if bias is None:
            return (scale * out).to(x_NK.dtype)
        with gathered([bias]):
            b = bias.detach().clone()
        return (scale * (out - b) + b).to(x_NK.dtype)


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


def activate(pre: list[torch.Tensor], gated: bool, act) -> torch.Tensor:
    """Pre-activation pieces (one per input projection) -> intermediate ``h``."""
    if not gated:
        return act(pre[0])
    gate, up = pre if len(pre) == 2 else pre[0].chunk(2, dim=-1)
    return act(gate) * up


def ffn_loop(ffn: FFNShape, stacks: nn.ModuleDict, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Reference path: every expert runs the whole FFN (frozen weights + its LoRAs) on its tokens."""
    acc = torch.promote_types(x_TD.dtype, torch.float32)  # fp32 sums for 16-bit inputs, float64 kept
    out_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
    for e in range(routing.num_experts):
        token_N, slot_N = torch.nonzero(routing.expert_TK == e, as_tuple=True)
        x_ND = x_TD[token_N]
        pre = [_apply(ffn.projection(n), stacks, n, e, x_ND) for n in ffn.input_names]
        h_NI = ffn.activate(pre)
        y_ND = _apply(ffn.projection(ffn.output_name), stacks, ffn.output_name, e, h_NI)
        out_TD.index_add_(0, token_N, y_ND.to(acc) * routing.weight_TK[token_N, slot_N].unsqueeze(-1).to(acc))
    return out_TD.to(x_TD.dtype)


def _apply(base: nn.Linear, stacks: nn.ModuleDict, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    return stacks[name].apply_expert(e, base, x) if name in stacks else base(x)


def ffn_grouped(ffn: FFNShape, stacks: nn.ModuleDict, x_TD: torch.Tensor, routing: Routing,
                dispatcher: LocalDispatcher, recompute: bool = True) -> torch.Tensor:
    """Optimized path: shared frozen work once per token, grouped low-rank work per expert."""
    plan = dispatcher.plan(routing)
    pre_dense = [ffn.projection(n)(x_TD) for n in ffn.input_names]  # W1 x, W3 x: once per token

    def per_pair(x_TD: torch.Tensor, *pre_dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x_PD = dispatcher.dispatch(plan, x_TD)
        pre = []
        for name, dense_TF in zip(ffn.input_names, pre_dense):
            pre_PF = dispatcher.dispatch(plan, dense_TF)
            if name in stacks:
                pre_PF = pre_PF + stacks[name].grouped_delta(x_PD, plan.offs_E)
            pre.append(pre_PF)
        h_PI = ffn.activate(pre)
        mixed_TI = dispatcher.combine(plan, h_PI)
        if ffn.output_name not in stacks:
            return (mixed_TI,)
        delta_PD = stacks[ffn.output_name].grouped_delta(h_PI, plan.offs_E)
        return mixed_TI, dispatcher.combine(plan, delta_PD)

    return _finish(ffn, stacks, x_TD, routing, per_pair, pre_dense, recompute)


def dense_pair_math(x_TD: torch.Tensor, onehot_TKE: torch.Tensor, weight_TK: torch.Tensor,
                    pre_dense: list[torch.Tensor], in_loras: list, out_lora, gated: bool,
                    act) -> tuple[torch.Tensor, ...]:
    """The per-pair part of the masked-dense path, as one pure function (so it can be compiled).

    ``in_loras[i]`` / ``out_lora``: ``(A [E*r, in], B [E*r, out] pre-scaled, dropout p)`` or None.
    Every expert's rank-r code is computed (one GEMM of width E*r), the unchosen ones are zeroed, and
    one GEMM of depth E*r applies all B matrices. With E*r small this extra arithmetic is free (the
    GEMMs are memory-bound), and there is no sort, gather or data-dependent shape.
    Returns the weight-mixed intermediate ``[T, I]`` and, with an output LoRA, its mixed delta ``[T, D]``.
    """
    T, K, E = onehot_TKE.shape
    pre = []
    for dense_TF, lora in zip(pre_dense, in_loras):
        pre_TKF = dense_TF.unsqueeze(1)
        if lora is not None:
            A, B, p = lora
            code_TKEr = (_dropout(x_TD, p) @ A.t()).view(T, 1, E, -1) * onehot_TKE.unsqueeze(-1)
            pre_TKF = pre_TKF + (code_TKEr.reshape(T * K, -1) @ B).view(T, K, -1)
        pre.append(pre_TKF.expand(-1, K, -1))
    h_TKI = activate(pre, gated, act)
    w_TK1 = weight_TK.to(h_TKI.dtype).unsqueeze(-1)
    mixed_TI = (h_TKI * w_TK1).sum(dim=1)
    if out_lora is None:
        return (mixed_TI,)
    A, B, p = out_lora
    code_TKEr = (_dropout(h_TKI, p) @ A.t()).view(T, K, E, -1)
    mixed_code_TEr = (code_TKEr * (onehot_TKE * w_TK1).unsqueeze(-1)).sum(dim=1)
    return mixed_TI, mixed_code_TEr.reshape(T, -1) @ B


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x


_COMPILED: dict = {}  # function -> its torch.compile wrapper, or False once compiling it failed


def run_compiled(fn, *args):
    """``fn(*args)`` through one shared ``torch.compile`` of ``fn`` (every block of a model has the
    same shapes, so they share one graph); eager inside an outer compile, and for good, with one
    warning, once compiling fails (no working compiler on the machine)."""
    if torch.compiler.is_compiling():
        return fn(*args)
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn)
    if compiled is not False:
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as e:
            import warnings

            warnings.warn(f"torch.compile of {fn.__name__} failed ({e!r}); using eager mode")
            _COMPILED[fn] = False
    return fn(*args)


def ffn_dense(ffn: FFNShape, stacks: nn.ModuleDict, x_TD: torch.Tensor, routing: Routing,
              recompute: bool = True, compiled: bool | None = None) -> torch.Tensor:
    """Optimized path without dispatch: pairs stay in token order ``[T, K, ...]`` and each expert
    LoRA runs as a masked GEMM over all experts (``dense_pair_math``). Same sharing of W1 x / W3 x
    and the same W2 fold as ``ffn_grouped``. ``compiled`` fuses the per-pair element-wise work with
    ``torch.compile`` (None: on CUDA devices only).

    Dropout on the input projections' LoRA input is drawn once per token and shared by its K
    experts (the reference draws one mask per expert); identical in eval mode and in expectation.
    """
    pre_dense = [ffn.projection(n)(x_TD) for n in ffn.input_names]
    onehot_TKE = torch.nn.functional.one_hot(routing.expert_TK, routing.num_experts).to(x_TD.dtype)
    in_loras = [stacks[n].stacked(x_TD.dtype) if n in stacks else None for n in ffn.input_names]
    out_lora = stacks[ffn.output_name].stacked(x_TD.dtype) if ffn.output_name in stacks else None
    if compiled is None:  # auto: fuse on GPUs, where launch count and memory passes dominate
        compiled = x_TD.is_cuda
    args = (onehot_TKE, routing.weight_TK)
    statics = (in_loras, out_lora, ffn.gated, ffn.act)

    def per_pair(x_TD: torch.Tensor, *pre_dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
        run = run_compiled if compiled else (lambda fn, *a: fn(*a))
        return run(dense_pair_math, x_TD, *args, list(pre_dense), *statics)

    return _finish(ffn, stacks, x_TD, routing, per_pair, pre_dense, recompute)


def _finish(ffn: FFNShape, stacks: nn.ModuleDict, x_TD: torch.Tensor, routing: Routing, per_pair,
            pre_dense: list[torch.Tensor], recompute: bool) -> torch.Tensor:
    """Run the per-pair part (recomputed in backward when training), then the frozen W2 once per token."""
    if recompute and torch.is_grad_enabled():
        parts = checkpoint(per_pair, x_TD, *pre_dense, use_reentrant=False)
    else:
        parts = per_pair(x_TD, *pre_dense)
    out_proj = ffn.projection(ffn.output_name)
    y_TD = out_proj(parts[0])  # frozen W2 once per token on the mixed intermediates
    if len(parts) > 1:
        y_TD = y_TD + parts[1]
    if out_proj.bias is not None:
        # W2 h + b summed with weights w gives (sum w) b; the fold applied b once.
        with gathered([out_proj.bias]):
            bias = out_proj.bias.detach().clone()
        y_TD = y_TD + (routing.weight_TK.sum(-1, keepdim=True) - 1).to(y_TD.dtype) * bias
    return y_TD
