"""``fused_pair_math``: the per-pair part of a gated MixLoRA FFN as a PyTorch custom op (opaque to
``torch.compile``, with its own backward): the low-rank GEMMs by cuBLAS, everything element-wise in one
pass each way (``triton_pair.py`` on GPU, ``torch_pair.py`` elsewhere).

Same contract as ``pair_math.dense_pair_math`` (which stays the oracle and the fallback), except that
routing comes as expert indices rather than a one-hot tensor, so the number of experts is passed.

Shapes: T tokens, K slots, P = T*K pairs (pair ``t*K + k``), I intermediate dim, ER = E*r.
The masked-dense trick carries over: a pair's code row keeps its own expert's r entries only, so one
GEMM of depth ER applies every pair's expert. Per direction the op runs

    forward:  DG = code1_P @ B1, DU = code3_P @ B3        ([P, I], GEMMs)
              mixed, HD = element-wise pass               (act, gate * up, slot mix, output dropout)
              mixed code = sum_k w_k (HD @ A2^T)_own      ([T, ER], GEMM + a small sum)
    backward: Q = dcode_P @ A2; DG, DU again               (GEMMs)
              dg, du, d G, d U, HD, d w = element-wise pass (in place over DG, DU, Q)
              d B1 = code1_P^T dg, d code1 = (dg B1^T)_own, likewise for B3; d A2 = (w dcode_P)^T HD

so the op saves only its inputs (the frozen pre-activations, the rank-r codes, the small weights, the
routing) and callers need no activation checkpoint around it. The [P, I] tensors live only inside one
direction of one block. Why not one kernel that forms the deltas in registers and never writes them:
that version was built first and measured 20-30x above its roofline (BENCHMARKS.md); cuBLAS runs
these memory-bound GEMMs near bandwidth, and the element-wise passes are plain streaming kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixlora_ds.model.kernels import torch_pair

try:
    from mixlora_ds.model.kernels import triton_pair
except ImportError:  # no triton: the element-wise passes run in PyTorch
    triton_pair = None

OP_NAMESPACE = "mixlora_ds"
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the element-wise passes on ``t`` run in the Triton kernels (CUDA, or CPU tensors under
    Triton's interpreter) rather than in PyTorch."""
    if triton_pair is None or t.dtype not in TRITON_DTYPES:
        return False
    return t.is_cuda or (triton_pair.INTERPRETED and t.device.type == "cpu")


def _passes(t: torch.Tensor):
    return triton_pair if uses_triton(t) else torch_pair


def _own(expert_TK: torch.Tensor, width: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, K, ER] mask: 1 on the r code entries of each slot's own expert."""
    block = torch.arange(width, device=expert_TK.device) // rank
    return (expert_TK.unsqueeze(-1) == block).to(dtype)


def _pair_rows(code_TR: torch.Tensor, own_TKR: torch.Tensor) -> torch.Tensor:
    """Every pair's code row, its own expert's entries only: [P, ER]."""
    return (code_TR.unsqueeze(1) * own_TKR).flatten(0, 1)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Where sums run: fp32 for 16-bit activations, float64 kept."""
    return torch.promote_types(t.dtype, torch.float32)


def _width(B1, B3, A2) -> int:
    return next(t for t in (B1, B3, A2) if t is not None).shape[0]


def _deltas(code1_P, code3_P, B1, B3):
    """The slots' expert deltas of the gate and up pre-activations, [P, I] each (None without a LoRA)."""
    DG = code1_P @ B1 if code1_P is not None else None
    DU = code3_P @ B3 if code3_P is not None else None
    return DG, DU


def _rows_or_none(code_TR, own_TKR):
    return _pair_rows(code_TR, own_TKR) if code_TR is not None else None


@torch.library.custom_op(f"{OP_NAMESPACE}::pair_ffn", mutates_args=())
def pair_ffn(gate: torch.Tensor, up: torch.Tensor, code1: torch.Tensor | None, code3: torch.Tensor | None,
             B1: torch.Tensor | None, B3: torch.Tensor | None, A2: torch.Tensor | None,
             expert_TK: torch.Tensor, weight_TK: torch.Tensor, seed: torch.Tensor, rank: int, p: float,
             act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mixed [T, I] in the activation dtype, mixed rank-r code of the down LoRA [T, ER] in fp32
    (float64 for float64 inputs), [T, 0] without a down LoRA). ``B1``/``B3`` are pre-scaled, ``[ER, I]``; ``A2`` is ``[ER, I]``."""
    T, I = gate.shape
    K = expert_TK.shape[1]
    ER = _width(B1, B3, A2)
    acc = _acc(gate)
    gate, up = gate.contiguous(), up.contiguous()
    weight_TK = weight_TK.to(acc).contiguous()
    mixed = torch.empty_like(gate)
    if T == 0:
        return mixed, gate.new_zeros(0, ER if A2 is not None else 0, dtype=acc)
    own = _own(expert_TK, ER, rank, gate.dtype)
    DG, DU = _deltas(_rows_or_none(code1, own), _rows_or_none(code3, own), B1, B3)
    HD = gate.new_empty(T * K, I) if A2 is not None else None
    _passes(gate).forward(gate, up, DG, DU, weight_TK, seed, mixed, HD, p, act, K)
    if A2 is None:
        return mixed, gate.new_zeros(T, 0, dtype=acc)
    code2 = (HD @ A2.t()).view(T, K, ER).to(acc)
    return mixed, (code2 * own * weight_TK.unsqueeze(-1)).sum(1)


@pair_ffn.register_fake
def _pair_ffn_fake(gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed, rank, p, act):
    T = gate.shape[0]
    width = A2.shape[0] if A2 is not None else 0
    return torch.empty_like(gate), gate.new_empty(T, width, dtype=_acc(gate))


@torch.library.custom_op(f"{OP_NAMESPACE}::pair_ffn_backward", mutates_args=())
def pair_ffn_backward(grad_mixed: torch.Tensor, grad_code: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      code1: torch.Tensor | None, code3: torch.Tensor | None, B1: torch.Tensor | None,
                      B3: torch.Tensor | None, A2: torch.Tensor | None, expert_TK: torch.Tensor,
                      weight_TK: torch.Tensor, seed: torch.Tensor, rank: int, p: float,
                      act: str) -> list[torch.Tensor]:
    """Gradients of ``pair_ffn``: [d gate, d up, d code1, d code3, d B1, d B3, d A2, d weight] in the
    inputs' dtypes (d weight in fp32 or float64); absent inputs get empty tensors."""
    T, I = gate.shape
    K = expert_TK.shape[1]
    ER = _width(B1, B3, A2)
    dtype, acc = gate.dtype, _acc(gate)
    gate, up = gate.contiguous(), up.contiguous()
    grad_mixed = grad_mixed.to(dtype).contiguous()
    weight_TK = weight_TK.to(acc).contiguous()
    empty = lambda: gate.new_empty(0)  # noqa: E731  (a fresh one each: outputs may not alias)
    dgate, dup = torch.empty_like(gate), torch.empty_like(gate)
    if T == 0:
        dgate.zero_(), dup.zero_()
        zeros = lambda t: torch.zeros_like(t) if t is not None else empty()  # noqa: E731
        return [dgate, dup, *map(zeros, (code1, code3, B1, B3, A2)), torch.zeros(0, K, device=gate.device, dtype=acc)]
    own = _own(expert_TK, ER, rank, dtype)
    dcode_P = _pair_rows(grad_code.to(dtype), own) if A2 is not None else None
    Q = dcode_P @ A2 if A2 is not None else None  # becomes HD in the pass
    code1_P, code3_P = _rows_or_none(code1, own), _rows_or_none(code3, own)
    DG, DU = _deltas(code1_P, code3_P, B1, B3)  # become dg, du in the pass
    passes = _passes(gate)
    tiles = triton_pair.grid(T, I)[1] if passes is triton_pair else 1
    dw_part = torch.empty(tiles, T, K, device=gate.device, dtype=acc)
    passes.backward(gate, up, DG, DU, grad_mixed, Q, weight_TK, seed, dgate, dup, dw_part, p, act, K)

    def lora_grads(code_P, B, dpre):
        if code_P is None:
            return empty(), empty()
        dcode = ((dpre @ B.t()).view(T, K, ER) * own).sum(1)
        return dcode, code_P.t() @ dpre

    dcode1, dB1 = lora_grads(code1_P, B1, DG)
    dcode3, dB3 = lora_grads(code3_P, B3, DU)
    dA2 = (dcode_P * weight_TK.view(-1, 1).to(dtype)).t() @ Q if A2 is not None else empty()
    return [dgate, dup, dcode1, dcode3, dB1, dB3, dA2, dw_part.sum(0)]


@pair_ffn_backward.register_fake
def _pair_ffn_backward_fake(grad_mixed, grad_code, gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK,
                            seed, rank, p, act):
    like = lambda t: torch.empty_like(t) if t is not None else gate.new_empty(0)  # noqa: E731
    return [torch.empty_like(gate), torch.empty_like(gate), *map(like, (code1, code3, B1, B3, A2)),
            gate.new_empty(gate.shape[0], expert_TK.shape[1], dtype=_acc(gate))]


def _setup_context(ctx, inputs, output):
    gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed, rank, p, act = inputs
    ctx.save_for_backward(gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed)
    ctx.rank, ctx.p, ctx.act = rank, p, act


def _backward(ctx, grad_mixed, grad_code):
    gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed = ctx.saved_tensors
    grads = torch.ops.mixlora_ds.pair_ffn_backward(grad_mixed, grad_code, gate, up, code1, code3, B1, B3, A2,
                                                   expert_TK, weight_TK, seed, ctx.rank, ctx.p, ctx.act)
    dgate, dup, dcode1, dcode3, dB1, dB3, dA2, dweight = grads
    given = lambda g, t: None if t is None else g  # noqa: E731
    return (dgate, dup, given(dcode1, code1), given(dcode3, code3), given(dB1, B1), given(dB3, B3),
            given(dA2, A2), None, dweight.to(weight_TK.dtype), None, None, None, None)


pair_ffn.register_autograd(_backward, setup_context=_setup_context)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x


def fused_pair_math(x_TD: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor,
                    pre_dense: list[torch.Tensor], in_loras: list, out_lora, gated: bool, act_name: str,
                    num_experts: int) -> tuple[torch.Tensor, ...]:
    """``dense_pair_math`` through ``pair_ffn`` (gated FFNs with an activation of
    ``triton_pair.ACTIVATIONS``: silu, gelu_tanh).

    ``pre_dense`` = [W1 x, W3 x]; ``in_loras[i]`` / ``out_lora``: ``(A [E*r, in], B [E*r, out]
    pre-scaled, dropout p)`` or None. The input-side dropout is drawn per token here (shared by its K
    slots, as in ``dense_pair_math``); the output-side one per (token, slot, column) in the pass.
    Returns the weight-mixed intermediate ``[T, I]`` and, with an output LoRA, its mixed delta ``[T, D]``.
    """
    if not gated or len(pre_dense) != 2:
        raise ValueError("fused_pair_math handles gated FFNs with separate gate and up projections only")
    if act_name not in ("silu", "gelu_tanh"):
        raise ValueError(f"fused_pair_math: activation {act_name!r} is not one of ['gelu_tanh', 'silu']")
    present = [lora for lora in (*in_loras, out_lora) if lora is not None]
    if not present:
        raise ValueError("fused_pair_math needs at least one expert LoRA")
    width = present[0][0].shape[0]
    if width % num_experts:
        raise ValueError(f"LoRA width {width} is not a multiple of num_experts={num_experts}")
    T, K = expert_TK.shape
    if T * K * pre_dense[0].shape[1] >= 2**31:
        raise ValueError("fused_pair_math: tokens x slots x intermediate must stay below 2**31")
    codes, Bs = [], []
    for lora in in_loras:
        codes.append(None if lora is None else _dropout(x_TD, lora[2]) @ lora[0].t())
        Bs.append(None if lora is None else lora[1])
    A2, B2, p_out = out_lora if out_lora is not None else (None, None, 0.0)
    if p_out > 0:  # drawn from torch's generator, so a checkpointed recompute draws the same seed
        seed = torch.randint(0, 2**31 - 1, (1,), device=x_TD.device, dtype=torch.int64)
    else:
        seed = torch.zeros(1, device=x_TD.device, dtype=torch.int64)
    gate, up = pre_dense
    mixed_TI, mixed_code = torch.ops.mixlora_ds.pair_ffn(gate, up, codes[0], codes[1], Bs[0], Bs[1], A2,
                                                         expert_TK, weight_TK, seed, width // num_experts,
                                                         float(p_out), act_name)
    if out_lora is None:
        return (mixed_TI,)
    return mixed_TI, mixed_code.to(B2.dtype) @ B2
