"""Triton kernels for the element-wise part of a gated MixLoRA feed-forward block: one pass forward,
one pass backward (``pair_op.py`` runs the GEMMs around them; ``torch_pair.py`` is the same maths in
PyTorch).

Shapes: T tokens, K slots per token, I intermediate dim; pair ``t*K + k`` is slot k of token t.
For each pair, with DG / DU its expert's gate / up deltas (rows of [T*K, I]) and w its weight:

    g = G[t] + DG[pair],  u = U[t] + DU[pair],  h = act(g) * u
    mixed[t] = sum_k w h            (what the frozen W2 consumes)
    HD[pair] = dropout(h)           (the down LoRA's input; its rank-r code is a GEMM outside)

The backward recomputes g, u, h from the same inputs. Each program covers a tile of tokens and
columns and loops over the K slots, so a token's frozen pre-activations are read once for all its
slots; the per-pair outputs of the backward are written over its per-pair inputs (DG, DU, Q), which
the program has read just before, so the pass needs no memory beyond its inputs.

The output-side dropout draws one Philox number per (pair, column) from a seed tensor, so the
backward (and a checkpointed recompute, which redraws the seed from the restored RNG state) sees the
forward's mask. With ``TRITON_INTERPRET=1`` set before triton is imported, the kernels run on CPU
tensors through Triton's interpreter (slow; for tests of the maths without a GPU).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
"""Activation name -> the kernels' code for it."""

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton's interpreter (set before triton is imported) runs the kernels on CPU tensors, for tests."""

TILE = (4, 16, 1) if INTERPRETED else (8, 256, 4)
"""(tokens, columns, warps) per program; small under the interpreter. ``bench_moe_block.py
--roofline`` times other tiles."""


@triton.jit
def _act_fwd(g, ACT: tl.constexpr):
    if ACT == 0:
        return g * tl.sigmoid(g)
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return g * tl.sigmoid(2.0 * z)  # 0.5 g (1 + tanh z) = g sigmoid(2z)


@triton.jit
def _act_bwd(g, ACT: tl.constexpr):
    """(act(g), act'(g))"""
    if ACT == 0:
        sig = tl.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    s2 = tl.sigmoid(2.0 * z)  # (1 + tanh z) / 2
    dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    return g * s2, s2 + g * 2.0 * s2 * (1.0 - s2) * dz


@triton.jit
def _tile(T, I, K: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    rmask = rows < T
    mask = rmask[:, None] & (cols < I)[None, :]
    offs = rows[:, None].to(tl.int64) * I + cols[None, :]
    return rows, cols, rmask, mask, offs


@triton.jit
def _slot(G_t, U_t, DG, DU, rows, cols, mask, k, I, K: tl.constexpr, HAS_L1: tl.constexpr,
          HAS_L3: tl.constexpr):
    """Slot k on the tile: pair offsets, and the gate and up pre-activations with the expert's deltas."""
    pair = (rows[:, None] * K + k) * I + cols[None, :]  # int32: T*K*I < 2**31 (checked by the caller)
    g = G_t
    u = U_t
    if HAS_L1:
        g = g + tl.load(DG + pair, mask=mask, other=0.0).to(tl.float32)
    if HAS_L3:
        u = u + tl.load(DU + pair, mask=mask, other=0.0).to(tl.float32)
    return pair, g, u


@triton.jit
def _pair_fwd(G, U, DG, DU, W, SEED, MIXED, HD, T, I, p_drop, drop_scale,
              K: tl.constexpr, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr, HAS_OUT: tl.constexpr,
              DROP: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr):
    rows, cols, rmask, mask, offs = _tile(T, I, K, BT, BI)
    G_t = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    U_t = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    seed = 0
    if DROP:
        seed = tl.load(SEED)
    mixed = tl.zeros([BT, BI], dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(W + rows * K + k, mask=rmask, other=0.0)
        pair, g, u = _slot(G_t, U_t, DG, DU, rows, cols, mask, k, I, K, HAS_L1, HAS_L3)
        h = _act_fwd(g, ACT) * u
        mixed += w[:, None] * h
        if HAS_OUT:
            if DROP:
                h = tl.where(tl.rand(seed, pair) >= p_drop, h * drop_scale, 0.0)
            tl.store(HD + pair, h.to(HD.dtype.element_ty), mask=mask)
    tl.store(MIXED + offs, mixed.to(MIXED.dtype.element_ty), mask=mask)


@triton.jit
def _pair_bwd(G, U, DG, DU, DM, Q, W, SEED, DGATE, DUP, DW_PART, T, I, p_drop, drop_scale,
              K: tl.constexpr, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr, HAS_OUT: tl.constexpr,
              DROP: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr):
    """Writes d g over DG, d u over DU, the dropped h over Q (per pair), their sums over the slots
    (d G, d U), and this column tile's part of each routing weight's gradient (DW_PART[tile, t, k])."""
    rows, cols, rmask, mask, offs = _tile(T, I, K, BT, BI)
    G_t = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    U_t = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dm = tl.load(DM + offs, mask=mask, other=0.0).to(tl.float32)
    seed = 0
    if DROP:
        seed = tl.load(SEED)
    dgate = tl.zeros([BT, BI], dtype=tl.float32)
    dup = tl.zeros([BT, BI], dtype=tl.float32)
    for k in tl.static_range(K):
        w = tl.load(W + rows * K + k, mask=rmask, other=0.0)
        pair, g, u = _slot(G_t, U_t, DG, DU, rows, cols, mask, k, I, K, HAS_L1, HAS_L3)
        a, da = _act_bwd(g, ACT)
        h = a * u
        dh = dm
        dw = tl.sum(dm * h, axis=1)
        if HAS_OUT:
            q = tl.load(Q + pair, mask=mask, other=0.0).to(tl.float32)  # d(code) @ A2: grad of dropped h
            if DROP:
                keep = tl.rand(seed, pair) >= p_drop
                h = tl.where(keep, h * drop_scale, 0.0)
            dw += tl.sum(h * q, axis=1)
            if DROP:
                q = tl.where(keep, q * drop_scale, 0.0)
            dh = dh + q
            tl.store(Q + pair, h.to(Q.dtype.element_ty), mask=mask)
        dh = w[:, None] * dh
        dg = dh * u * da
        du = dh * a
        dgate += dg
        dup += du
        if HAS_L1:
            tl.store(DG + pair, dg.to(DG.dtype.element_ty), mask=mask)
        if HAS_L3:
            tl.store(DU + pair, du.to(DU.dtype.element_ty), mask=mask)
        tl.store(DW_PART + (tl.program_id(1) * T + rows) * K + k, dw, mask=rmask)
    tl.store(DGATE + offs, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, dup.to(DUP.dtype.element_ty), mask=mask)


def grid(T: int, I: int, tile=TILE) -> tuple[int, int]:
    return triton.cdiv(T, tile[0]), triton.cdiv(I, tile[1])


def forward(G, U, DG, DU, W, seed, mixed, HD, p: float, act: str, K: int, tile=TILE) -> None:
    """Launch the forward pass; absent per-pair tensors (None) are left out of the maths."""
    T, I = G.shape
    flags = _flags(DG, DU, HD, p, act)
    _pair_fwd[grid(T, I, tile)](G, U, _or(DG, G), _or(DU, G), W, seed, mixed, _or(HD, G), T, I, p, _scale(p),
                                K=K, **flags, BT=tile[0], BI=tile[1], num_warps=tile[2])


def backward(G, U, DG, DU, DM, Q, W, seed, dgate, dup, dw_part, p: float, act: str, K: int, tile=TILE) -> None:
    """Launch the backward pass (in place over DG, DU and Q; see ``_pair_bwd``); ``dw_part`` has one
    row per column tile, ``grid(T, I, tile)[1]``."""
    T, I = G.shape
    flags = _flags(DG, DU, Q, p, act)
    _pair_bwd[grid(T, I, tile)](G, U, _or(DG, G), _or(DU, G), DM, _or(Q, G), W, seed, dgate, dup, dw_part, T, I,
                                p, _scale(p), K=K, **flags, BT=tile[0], BI=tile[1], num_warps=tile[2])


def _flags(DG, DU, out, p: float, act: str) -> dict:
    return {"HAS_L1": DG is not None, "HAS_L3": DU is not None, "HAS_OUT": out is not None,
            "DROP": out is not None and p > 0, "ACT": ACTIVATIONS[act]}


def _scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1 else 0.0


def _or(t, like):
    """The tensor, or a stand-in for an absent one (never read: its flag is off)."""
    return t if t is not None else like
