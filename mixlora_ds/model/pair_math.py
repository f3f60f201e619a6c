"""The per-pair part of a folded MixLoRA feed-forward block: one function per way of computing it.

Shapes: T rows, K slots per row, E experts (those this process holds), r LoRA rank, D model dim,
I FFN intermediate dim, F any projection output.

Every function here has the ``PairMath`` signature: from the rows ``x``, the frozen pre-activations
(``W1 x``, ``W3 x``), each slot's expert and weight, and the stacked expert LoRAs, it returns the
weight-mixed intermediate ``sum_k w_k h_k`` [T, I] and, with an output LoRA, the weight-mixed output
delta ``sum_k w_k s B2_k A2_k h_k`` [T, D]. ``experts.folded_ffn`` applies the frozen W2 and its bias.

``in_loras[i]`` / ``out_lora``: ``(A [E*r, in], B [E*r, out] pre-scaled, dropout p)`` or None.
Input-side LoRA dropout is drawn once per row and shared by its K slots (the reference draws one
mask per expert): identical in eval mode and in expectation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mixlora_ds.model.grouped_mm import grouped_mm
from mixlora_ds.model.mixing import expert_onehot, keep_own_codes, mix_own_codes, mix_slots, slot_weights
from mixlora_ds.model.pair_order import gather_pairs, mix_pairs, sort_pairs_by_expert

PairMath = Callable[..., tuple]
"""``(x_TD, expert_TK, weight_TK, pre_dense, in_loras, out_lora, gated, act, num_experts) ->
(mixed_TI,) or (mixed_TI, delta_TD)``."""


def activate(pre: list[torch.Tensor], gated: bool, act) -> torch.Tensor:
    """Pre-activation pieces (one per input projection) -> intermediate ``h``."""
    if not gated:
        return act(pre[0])
    gate, up = pre if len(pre) == 2 else pre[0].chunk(2, dim=-1)
    return act(gate) * up


def dense_pair_math(x_TD: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor,
                    pre_dense: list[torch.Tensor], in_loras: list, out_lora, gated: bool, act,
                    num_experts: int) -> tuple[torch.Tensor, ...]:
    """Masked-dense: pairs stay in row order ``[T, K, ...]``. Every expert's rank-r code is computed
    (one GEMM of width E*r), the unchosen ones are zeroed, and one GEMM of depth E*r applies all B
    matrices. With E*r small this extra arithmetic is free (the GEMMs are memory-bound), and there is
    no sort, gather or data-dependent shape, so it compiles to one graph."""
    T, K = expert_TK.shape
    E = num_experts  # shapes spelled out: T may be 0 (a rank whose experts got no tokens)
    onehot_TKE = expert_onehot(expert_TK, E, x_TD.dtype)
    pre = []
    for dense_TF, lora in zip(pre_dense, in_loras):
        pre_TKF = dense_TF.unsqueeze(1)
        if lora is not None:
            A, B, p = lora
            code_TKEr = keep_own_codes((_dropout(x_TD, p) @ A.t()).view(T, 1, E, A.shape[0] // E), onehot_TKE)
            pre_TKF = pre_TKF + (code_TKEr.reshape(T * K, A.shape[0]) @ B).view(T, K, B.shape[-1])
        pre.append(pre_TKF.expand(-1, K, -1))
    h_TKI = activate(pre, gated, act)
    w_TK1 = slot_weights(weight_TK, h_TKI.dtype)
    mixed_TI = mix_slots(h_TKI, w_TK1)
    if out_lora is None:
        return (mixed_TI,)
    A, B, p = out_lora
    code_TKEr = (_dropout(h_TKI, p) @ A.t()).view(T, K, E, A.shape[0] // E)
    return mixed_TI, mix_own_codes(code_TKEr, onehot_TKE, w_TK1).reshape(T, A.shape[0]) @ B


def grouped_pair_math(x_TD: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor,
                      pre_dense: list[torch.Tensor], in_loras: list, out_lora, gated: bool, act,
                      num_experts: int) -> tuple[torch.Tensor, ...]:
    """Grouped: pairs sorted by expert (``pair_order``), each expert's LoRA one matmul over its
    contiguous slice (``grouped_mm``)."""
    order = sort_pairs_by_expert(expert_TK, weight_TK, num_experts)

    def delta(x_PF: torch.Tensor, lora) -> torch.Tensor:
        A, B, _ = lora
        E = num_experts
        low_Pr = grouped_mm(x_PF, A.view(E, -1, A.shape[-1]).transpose(1, 2), order.offs_E)
        return grouped_mm(low_Pr, B.view(E, -1, B.shape[-1]), order.offs_E)

    pre = []
    for dense_TF, lora in zip(pre_dense, in_loras):
        pre_PF = gather_pairs(order, dense_TF)
        if lora is not None:
            pre_PF = pre_PF + delta(gather_pairs(order, _dropout(x_TD, lora[2])), lora)
        pre.append(pre_PF)
    h_PI = activate(pre, gated, act)
    mixed_TI = mix_pairs(order, h_PI)
    if out_lora is None:
        return (mixed_TI,)
    return mixed_TI, mix_pairs(order, delta(_dropout(h_PI, out_lora[2]), out_lora))


PAIR_MATH: dict[str, PairMath] = {"dense": dense_pair_math, "grouped": grouped_pair_math}
"""The folded compute paths by name (``moe.set_compute_path``)."""


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
