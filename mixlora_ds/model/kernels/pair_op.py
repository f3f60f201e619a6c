"""``fused_pair_math``: the per-pair part of a gated MixLoRA FFN through the Triton kernels of
``triton_pair.py``, as a PyTorch custom op (opaque to ``torch.compile``, with its own backward).

Same contract as ``experts.dense_pair_math`` (which stays the oracle and the fallback), except that
routing comes as expert indices rather than a one-hot tensor, so the number of experts is passed.
The op saves only its inputs (the frozen pre-activations, the rank-r codes, the small weights and
the routing) and recomputes the per-pair intermediates in its backward, so callers need no
activation checkpoint around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from mixlora_ds.model.kernels import triton_pair as kern

OP_NAMESPACE = "mixlora_ds"


def _launch_args(gate, B1, B3, A2):
    """T, I, E*r, and E*r padded to a power of two >= 16 (tl.dot's smallest dimension)."""
    T, I = gate.shape
    ER = next(t for t in (B1, B3, A2) if t is not None).shape[0]
    return T, I, ER, 1 << max(4, (ER - 1).bit_length())


def _flags(code1, code3, A2, p: float, dtype: torch.dtype, act: str) -> dict:
    return {"HAS_L1": code1 is not None, "HAS_L3": code3 is not None, "HAS_OUT": A2 is not None,
            "DROP": A2 is not None and p > 0, "ACT": kern.ACTIVATIONS[act],
            "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32"}


def _meta(gate: torch.Tensor, interpreter_meta: dict) -> dict:
    """Tile sizes: autotuned on GPU; fixed under the interpreter, the only way to run on CPU."""
    if kern.INTERPRETED:
        return interpreter_meta
    if not gate.is_cuda:
        raise RuntimeError("the fused MixLoRA kernels need CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    return {}


def _contig(t):
    return None if t is None else t.contiguous()


@torch.library.custom_op(f"{OP_NAMESPACE}::pair_ffn", mutates_args=())
def pair_ffn(gate: torch.Tensor, up: torch.Tensor, code1: torch.Tensor | None, code3: torch.Tensor | None,
             B1: torch.Tensor | None, B3: torch.Tensor | None, A2: torch.Tensor | None,
             expert_TK: torch.Tensor, weight_TK: torch.Tensor, seed: torch.Tensor, rank: int, p: float,
             act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mixed [T, I] in the activation dtype, mixed rank-r code of the down LoRA [T, E*r] fp32;
    [T, 0] without a down LoRA)."""
    gate, up, code1, code3, B1, B3, A2 = map(_contig, (gate, up, code1, code3, B1, B3, A2))
    expert_TK, weight_TK = expert_TK.contiguous(), weight_TK.float().contiguous()
    T, I, ER, ER_P = _launch_args(gate, B1, B3, A2)
    K = expert_TK.shape[1]
    mixed = torch.empty_like(gate)
    mcode = torch.zeros(T, ER if A2 is not None else 0, device=gate.device, dtype=torch.float32)
    if T == 0:
        return mixed, mcode
    dummy = gate
    args = (gate, up, code1 if code1 is not None else dummy, code3 if code3 is not None else dummy,
            B1 if B1 is not None else dummy, B3 if B3 is not None else dummy, A2 if A2 is not None else dummy,
            expert_TK, weight_TK, seed, mixed, mcode if A2 is not None else dummy,
            T, I, ER, rank, p, 1.0 / (1.0 - p) if p < 1 else 0.0)
    flags = dict(K=K, ER_P=ER_P, **_flags(code1, code3, A2, p, gate.dtype, act))
    meta = _meta(gate, kern.INTERPRETER_FWD_META)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(I, m["BLOCK_I"]))  # noqa: E731
    kern.pair_fwd[grid](*args, **flags, **meta)
    return mixed, mcode


@pair_ffn.register_fake
def _pair_ffn_fake(gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed, rank, p, act):
    T = gate.shape[0]
    width = A2.shape[0] if A2 is not None else 0
    return torch.empty_like(gate), gate.new_empty(T, width, dtype=torch.float32)


@torch.library.custom_op(f"{OP_NAMESPACE}::pair_ffn_backward", mutates_args=())
def pair_ffn_backward(grad_mixed: torch.Tensor, grad_code: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      code1: torch.Tensor | None, code3: torch.Tensor | None, B1: torch.Tensor | None,
                      B3: torch.Tensor | None, A2: torch.Tensor | None, expert_TK: torch.Tensor,
                      weight_TK: torch.Tensor, seed: torch.Tensor, rank: int, p: float,
                      act: str) -> list[torch.Tensor]:
    """Gradients of ``pair_ffn``: [d gate, d up, d code1, d code3, d B1, d B3, d A2, d weight]; the
    reduced ones (codes, weights, routing weights) in fp32, absent inputs as empty tensors."""
    gate, up, code1, code3, B1, B3, A2 = map(_contig, (gate, up, code1, code3, B1, B3, A2))
    grad_mixed = grad_mixed.to(gate.dtype).contiguous()
    expert_TK, weight_TK = expert_TK.contiguous(), weight_TK.float().contiguous()
    T, I, ER, ER_P = _launch_args(gate, B1, B3, A2)
    K = expert_TK.shape[1]
    f32 = dict(device=gate.device, dtype=torch.float32)
    empty = lambda: gate.new_empty(0)  # noqa: E731  (a fresh one each: outputs may not alias)
    dgate, dup = torch.empty_like(gate), torch.empty_like(gate)
    dcode1 = torch.zeros(T, ER, **f32) if code1 is not None else empty()
    dcode3 = torch.zeros(T, ER, **f32) if code3 is not None else empty()
    dB1 = torch.zeros(ER, I, **f32) if B1 is not None else empty()
    dB3 = torch.zeros(ER, I, **f32) if B3 is not None else empty()
    dA2 = torch.zeros(ER, I, **f32) if A2 is not None else empty()
    dweight = torch.zeros(T, K, **f32)
    if T == 0:
        dgate.zero_(), dup.zero_()
        return [dgate, dup, dcode1, dcode3, dB1, dB3, dA2, dweight]
    dummy = gate
    grad_code = grad_code.float().contiguous() if A2 is not None else dummy
    pick = lambda t: t if t is not None and t.numel() else dummy  # noqa: E731
    args = (gate, up, pick(code1), pick(code3), pick(B1), pick(B3), pick(A2), expert_TK, weight_TK, seed,
            grad_mixed, grad_code, dgate, dup, pick(dcode1), pick(dcode3), pick(dB1), pick(dB3), pick(dA2),
            dweight, T, I, ER, rank, p, 1.0 / (1.0 - p) if p < 1 else 0.0)
    flags = dict(K=K, ER_P=ER_P, **_flags(code1, code3, A2, p, gate.dtype, act))
    meta = _meta(gate, kern.INTERPRETER_BWD_META)
    grid = lambda m: (triton.cdiv(I, m["BLOCK_I"]), triton.cdiv(triton.cdiv(T, m["BLOCK_T"]), m["TILES_T"]))  # noqa: E731
    kern.pair_bwd[grid](*args, **flags, **meta)
    return [dgate, dup, dcode1, dcode3, dB1, dB3, dA2, dweight]


@pair_ffn_backward.register_fake
def _pair_ffn_backward_fake(grad_mixed, grad_code, gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK,
                            seed, rank, p, act):
    T, I = gate.shape
    ER = next(t for t in (B1, B3, A2) if t is not None).shape[0]
    f32 = dict(dtype=torch.float32)
    empty = lambda: gate.new_empty(0)  # noqa: E731
    return [torch.empty_like(gate), torch.empty_like(gate),
            gate.new_empty(T, ER, **f32) if code1 is not None else empty(),
            gate.new_empty(T, ER, **f32) if code3 is not None else empty(),
            gate.new_empty(ER, I, **f32) if B1 is not None else empty(),
            gate.new_empty(ER, I, **f32) if B3 is not None else empty(),
            gate.new_empty(ER, I, **f32) if A2 is not None else empty(),
            gate.new_empty(T, expert_TK.shape[1], **f32)]


def _setup_context(ctx, inputs, output):
    gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed, rank, p, act = inputs
    ctx.save_for_backward(gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed)
    ctx.rank, ctx.p, ctx.act = rank, p, act


def _backward(ctx, grad_mixed, grad_code):
    gate, up, code1, code3, B1, B3, A2, expert_TK, weight_TK, seed = ctx.saved_tensors
    grads = torch.ops.mixlora_ds.pair_ffn_backward(grad_mixed, grad_code, gate, up, code1, code3, B1, B3, A2,
                                                   expert_TK, weight_TK, seed, ctx.rank, ctx.p, ctx.act)
    dgate, dup, dcode1, dcode3, dB1, dB3, dA2, dweight = grads
    like = lambda g, t: None if t is None else g.to(t.dtype)  # noqa: E731
    return (dgate, dup, like(dcode1, code1), like(dcode3, code3), like(dB1, B1), like(dB3, B3), like(dA2, A2),
            None, dweight.to(weight_TK.dtype), None, None, None, None)


pair_ffn.register_autograd(_backward, setup_context=_setup_context)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x


def fused_pair_math(x_TD: torch.Tensor, expert_TK: torch.Tensor, weight_TK: torch.Tensor,
                    pre_dense: list[torch.Tensor], in_loras: list, out_lora, gated: bool, act_name: str,
                    num_experts: int) -> tuple[torch.Tensor, ...]:
    """``dense_pair_math`` through the fused kernels (gated FFNs with an activation in
    ``triton_pair.ACTIVATIONS``; see ``supports``).

    ``pre_dense`` = [W1 x, W3 x]; ``in_loras[i]`` / ``out_lora``: ``(A [E*r, in], B [E*r, out]
    pre-scaled, dropout p)`` or None. The input-side dropout is drawn per token here (shared by its K
    slots, as in ``dense_pair_math``); the output-side one per (token, slot, column) in the kernel.
    Returns the weight-mixed intermediate ``[T, I]`` and, with an output LoRA, its mixed delta ``[T, D]``.
    """
    if not gated or len(pre_dense) != 2:
        raise ValueError("fused_pair_math handles gated FFNs with separate gate and up projections only")
    if act_name not in kern.ACTIVATIONS:
        raise ValueError(f"fused_pair_math: activation {act_name!r} is not one of {sorted(kern.ACTIVATIONS)}")
    loras = [*in_loras, out_lora]
    present = [lora for lora in loras if lora is not None]
    if not present:
        raise ValueError("fused_pair_math needs at least one expert LoRA")
    width = present[0][0].shape[0]
    if width % num_experts:
        raise ValueError(f"LoRA width {width} is not a multiple of num_experts={num_experts}")
    rank = width // num_experts
    T, K = expert_TK.shape
    if T * K * pre_dense[0].shape[1] >= 2**31:
        raise ValueError("fused_pair_math: tokens x slots x intermediate must stay below 2**31")
    gate, up = pre_dense
    codes, Bs = [], []
    for lora in in_loras:
        if lora is None:
            codes.append(None), Bs.append(None)
        else:
            A, B, p = lora
            codes.append(_dropout(x_TD, p) @ A.t())
            Bs.append(B)
    A2, B2, p_out = out_lora if out_lora is not None else (None, None, 0.0)
    if p_out > 0:  # drawn from torch's generator, so a checkpointed recompute draws the same seed
        seed = torch.randint(0, 2**31 - 1, (1,), device=x_TD.device, dtype=torch.int64)
    else:
        seed = torch.zeros(1, device=x_TD.device, dtype=torch.int64)
    mixed_TI, mixed_code = torch.ops.mixlora_ds.pair_ffn(gate, up, codes[0], codes[1], Bs[0], Bs[1], A2,
                                                         expert_TK, weight_TK, seed, rank, float(p_out), act_name)
    if out_lora is None:
        return (mixed_TI,)
    return mixed_TI, mixed_code.to(B2.dtype) @ B2

