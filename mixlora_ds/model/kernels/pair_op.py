"""``fused_pair_math``: the per-pair part of a gated MixLoRA FFN through the Triton kernels of
``triton_pair.py``, as a PyTorch custom op (opaque to ``torch.compile``, with its own backward).

Same contract as ``experts.dense_pair_math`` (which stays the oracle and the fallback), except that
routing comes as expert indices rather than a one-hot tensor, so the number of experts is passed.
The op saves only its inputs (the frozen pre-activations, the rank-r codes, the small weights and
the routing) and recomputes the per-pair intermediates in its backward, so callers need no
activation checkpoint around it.
"""

from __future__ import annotations

import functools

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
            # fp32: three TF32 products per dot (about fp32 accuracy on tensor cores; plain IEEE fp32
            # dots are FMA loops that take ptxas minutes to compile at these tile sizes)
            "DOT_PREC": "tf32x3" if dtype == torch.float32 else "tf32"}


def _meta(gate: torch.Tensor) -> dict:
    """Tile sizes: autotuned on GPU; fixed under the interpreter, the only way to run on CPU."""
    if kern.INTERPRETED:
        return dict(kern.INTERPRETER_META)
    if not gate.is_cuda:
        raise RuntimeError("the fused MixLoRA kernels need CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    return {}


def _class(gate: torch.Tensor, er_padded: int) -> str:
    return kern.tile_class(gate.dtype == torch.float32, er_padded)


def _programs(device: torch.device) -> int:
    """How many programs fill the GPU about twice (the chunked grids aim at this)."""
    if kern.INTERPRETED:
        return 2 * kern.INTERPRETER_SMS
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _chunks(n_other: int, n_tiles: int, programs: int) -> int:
    """Chunks to split n_tiles into so that n_other x chunks programs fill the GPU."""
    return max(1, min(n_tiles, triton.cdiv(programs, max(n_other, 1))))


def _contig(t):
    return None if t is None else t.contiguous()


def _or_dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The tensor, or a one-element stand-in for an absent one (never read, and its own storage, so
    autotuning's zeroing of outputs cannot touch a real input)."""
    return t if t is not None else like.new_zeros(1)


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
    args = (gate, up, _or_dummy(code1, gate), _or_dummy(code3, gate), _or_dummy(B1, gate), _or_dummy(B3, gate),
            _or_dummy(A2, gate), expert_TK, weight_TK, seed, mixed, mcode if A2 is not None else gate.new_zeros(1),
            T, I, ER, rank, p, 1.0 / (1.0 - p) if p < 1 else 0.0)
    flags = dict(K=K, ER_P=ER_P, **_flags(code1, code3, A2, p, gate.dtype, act))
    programs = _programs(gate.device)

    def grid(m):
        n_t = triton.cdiv(T, m["BLOCK_T"])
        return n_t, _chunks(n_t, triton.cdiv(I, m["BLOCK_I"]), programs)

    kern.KERNELS[_class(gate, ER_P), "fwd"][grid](*args, **flags, **_meta(gate))
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
    reduced ones (codes, weights, routing weights) in fp32, absent inputs as empty tensors.

    Two kernels, each recomputing the per-pair intermediates: one over token tiles (gate, up, code and
    routing-weight gradients), one over column tiles (B1, B3, A2 gradients), so that each sums its
    reductions in registers instead of in contended atomics."""
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
    grad_code = grad_code.to(gate.dtype).contiguous() if A2 is not None else None
    real = lambda t: t if t is not None and t.numel() else None  # noqa: E731
    inputs = (gate, up, _or_dummy(code1, gate), _or_dummy(code3, gate), _or_dummy(B1, gate), _or_dummy(B3, gate),
              _or_dummy(A2, gate), expert_TK, weight_TK, seed, grad_mixed, _or_dummy(grad_code, gate))
    sizes = (T, I, ER, rank, p, 1.0 / (1.0 - p) if p < 1 else 0.0)
    flags = dict(K=K, ER_P=ER_P, **_flags(code1, code3, A2, p, gate.dtype, act))
    meta = _meta(gate)
    programs = _programs(gate.device)

    def token_grid(m):
        n_t = triton.cdiv(T, m["BLOCK_T"])
        return n_t, _chunks(n_t, triton.cdiv(I, m["BLOCK_I"]), programs)

    kern.KERNELS[_class(gate, ER_P), "bwd_tokens"][token_grid](
        *inputs, dgate, dup, _or_dummy(real(dcode1), gate), _or_dummy(real(dcode3), gate), dweight, *sizes,
        K_P=triton.next_power_of_2(K), **flags, **meta)

    def weight_grid(m):
        n_i = triton.cdiv(I, m["BLOCK_I"])
        return n_i, _chunks(n_i, triton.cdiv(T, m["BLOCK_T"]), programs)

    kern.KERNELS[_class(gate, ER_P), "bwd_weights"][weight_grid](
        *inputs, _or_dummy(real(dB1), gate), _or_dummy(real(dB3), gate), _or_dummy(real(dA2), gate), *sizes,
        **flags, **meta)
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

