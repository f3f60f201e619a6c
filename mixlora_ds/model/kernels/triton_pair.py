"""Triton kernels for the per-pair part of a gated MixLoRA feed-forward block.

Shapes: T tokens, K slots per token, I intermediate dim, E experts, r rank, ER = E*r.
For slot k of token t with expert e = expert[t, k] and weight w = weight[t, k]:

    g_k = G[t] + c1[t, e-block] @ B1[e-block]      (gate pre-activation with the expert's delta)
    u_k = U[t] + c3[t, e-block] @ B3[e-block]      (up pre-activation)
    h_k = act(g_k) * u_k
    mixed[t]        += w * h_k                        (what the frozen W2 consumes)
    mixed_code[t, e-block] += w * (drop_k(h_k) @ A2[e-block]^T)   (rank-r input of the down LoRA)

``c1 = dropout(x) @ A1^T`` and ``c3`` are the rank-r codes of every expert ([T, ER], computed outside).
A tile of tokens holds many experts, so each slot's delta is one tensor-core dot of depth ER over the
code masked to the slot's expert block (the masked-dense trick of ``experts.dense_pair_math``, here
on tiles in registers). Nothing of shape [T, K, I] is written: the backward recomputes g_k, u_k, h_k.

Reductions that cross tiles (the rank-r codes over I, the weight gradients over tokens) are summed
with fp32 atomics; so those outputs must start zeroed, and their low bits vary from run to run.
The output-side dropout draws a Philox number per (token, slot, column) from a seed tensor, so the
backward (and a checkpointed recompute, which redraws the seed from the restored RNG state) sees the
forward's mask.

With ``TRITON_INTERPRET=1`` set before triton is imported, the kernels run on CPU tensors through
Triton's interpreter (slow; for tests of the maths without a GPU).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
"""Activation name -> the kernels' code for it."""


@triton.jit
def _act_fwd(gk, ACT: tl.constexpr):
    if ACT == 0:
        return gk * tl.sigmoid(gk)
    z = 0.7978845608028654 * (gk + 0.044715 * gk * gk * gk)
    return gk * tl.sigmoid(2.0 * z)  # 0.5 g (1 + tanh z) = g sigmoid(2z)


@triton.jit
def _act_bwd(gk, ACT: tl.constexpr):
    """(act(g), act'(g))"""
    if ACT == 0:
        sig = tl.sigmoid(gk)
        return gk * sig, sig * (1.0 + gk * (1.0 - sig))
    z = 0.7978845608028654 * (gk + 0.044715 * gk * gk * gk)
    s2 = tl.sigmoid(2.0 * z)  # (1 + tanh z) / 2
    dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * gk * gk)
    return gk * s2, s2 + gk * 2.0 * s2 * (1.0 - s2) * dz


@triton.jit
def _pair_pre(g, u, c1, c3, b1, b3, sel, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr, DOT_PREC: tl.constexpr):
    """One slot's gate and up pre-activations on a tile: the frozen part plus the slot's expert delta."""
    gk = g
    uk = u
    if HAS_L1:
        gk = gk + tl.dot(tl.where(sel, c1, 0.0), b1, input_precision=DOT_PREC)
    if HAS_L3:
        uk = uk + tl.dot(tl.where(sel, c3, 0.0), b3, input_precision=DOT_PREC)
    return gk, uk


@triton.jit
def _chunk(pid, n_programs, n_tiles):
    """Tiles [start, stop) of the pid-th of n_programs contiguous chunks of n_tiles tiles."""
    per = tl.cdiv(n_tiles, n_programs)
    start = pid * per
    return start, tl.minimum(start + per, n_tiles)


@triton.jit
def _pair_fwd(G, U, C1, C3, B1, B3, A2, EXP, W, SEED, MIXED, MCODE,
              T, I, ER, R, p_drop, drop_scale,
              K: tl.constexpr, ER_P: tl.constexpr, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr,
              HAS_OUT: tl.constexpr, DROP: tl.constexpr, ACT: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program: one token tile, a chunk of I tiles (the down LoRA's codes are summed over the
    chunk in registers and added once)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    er = tl.arange(0, ER_P)
    rmask, emask = rows < T, er < ER
    code_offs = rows[:, None].to(tl.int64) * ER + er[None, :]
    code_mask = rmask[:, None] & emask[None, :]
    c1 = tl.zeros([BLOCK_T, ER_P], dtype=tl.float32)  # placeholders when a LoRA is absent (unused)
    c3 = c1
    if HAS_L1:
        c1 = tl.load(C1 + code_offs, mask=code_mask, other=0.0)
    if HAS_L3:
        c3 = tl.load(C3 + code_offs, mask=code_mask, other=0.0)
    if HAS_OUT:
        mcode = tl.zeros([BLOCK_T, ER_P], dtype=tl.float32)
    seed = 0
    if DROP:
        seed = tl.load(SEED)
    start, stop = _chunk(tl.program_id(1), tl.num_programs(1), tl.cdiv(I, BLOCK_I))
    for it in range(start, stop):
        cols = it * BLOCK_I + tl.arange(0, BLOCK_I)
        cmask = cols < I
        tile = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * I + cols[None, :]
        g = tl.load(G + offs, mask=tile, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=tile, other=0.0).to(tl.float32)
        w_offs = er[:, None] * I + cols[None, :]
        w_mask = emask[:, None] & cmask[None, :]
        b1 = tl.zeros([ER_P, BLOCK_I], dtype=tl.float32)
        b3 = b1
        if HAS_L1:
            b1 = tl.load(B1 + w_offs, mask=w_mask, other=0.0)
        if HAS_L3:
            b3 = tl.load(B3 + w_offs, mask=w_mask, other=0.0)
        if HAS_OUT:
            a2t = tl.load(A2 + er[None, :] * I + cols[:, None], mask=emask[None, :] & cmask[:, None], other=0.0)
        mixed = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        for k in tl.static_range(K):
            e = tl.load(EXP + rows * K + k, mask=rmask, other=0)
            w = tl.load(W + rows * K + k, mask=rmask, other=0.0)
            sel = (er[None, :] // R) == e[:, None]
            gk, uk = _pair_pre(g, u, c1, c3, b1, b3, sel, HAS_L1, HAS_L3, DOT_PREC)
            h = _act_fwd(gk, ACT) * uk
            mixed += w[:, None] * h
            if HAS_OUT:
                hd = h
                if DROP:
                    rnd = tl.rand(seed, (rows[:, None] * K + k) * I + cols[None, :])
                    hd = tl.where(rnd >= p_drop, h * drop_scale, 0.0)
                code = tl.dot(hd.to(a2t.dtype), a2t, input_precision=DOT_PREC)
                mcode += tl.where(sel, code * w[:, None], 0.0)
        tl.store(MIXED + offs, mixed.to(MIXED.dtype.element_ty), mask=tile)
    if HAS_OUT:
        tl.atomic_add(MCODE + code_offs, mcode, mask=code_mask)


@triton.jit
def _pair_grad_h(g, u, dm, c1, c3, dmc, b1, b3, a2, e, w, sel, rows, cols, k, seed, I, p_drop, drop_scale,
                 K: tl.constexpr, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr, HAS_OUT: tl.constexpr,
                 DROP: tl.constexpr, ACT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Recompute one slot on a tile and return (d gate-pre, d up-pre, dropped h, d w partial sum over
    the tile's columns, the slot's masked code gradient)."""
    gk, uk = _pair_pre(g, u, c1, c3, b1, b3, sel, HAS_L1, HAS_L3, DOT_PREC)
    a, da = _act_bwd(gk, ACT)
    h = a * uk
    dh = w[:, None] * dm
    dw = tl.sum(dm * h, axis=1)
    hd = h
    dmcm = dmc
    if HAS_OUT:
        dmcm = tl.where(sel, dmc, 0.0)
        q = tl.dot(dmcm.to(a2.dtype), a2, input_precision=DOT_PREC)
        if DROP:
            rnd = tl.rand(seed, (rows[:, None] * K + k) * I + cols[None, :])
            keep = rnd >= p_drop
            hd = tl.where(keep, h * drop_scale, 0.0)
            dh += w[:, None] * tl.where(keep, q * drop_scale, 0.0)
        else:
            dh += w[:, None] * q
        dw += tl.sum(hd * q, axis=1)
    return dh * uk * da, dh * a, hd, dw, dmcm


@triton.jit
def _pair_bwd_tokens(G, U, C1, C3, B1, B3, A2, EXP, W, SEED, DM, DMC,
                     DG, DU, DC1, DC3, DW,
                     T, I, ER, R, p_drop, drop_scale,
                     K: tl.constexpr, K_P: tl.constexpr, ER_P: tl.constexpr, HAS_L1: tl.constexpr,
                     HAS_L3: tl.constexpr, HAS_OUT: tl.constexpr, DROP: tl.constexpr, ACT: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    """Token-side gradients. One program: one token tile, a chunk of I tiles; writes d gate and d up,
    sums the codes' and routing weights' gradients over the chunk in registers, adds them once."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    er = tl.arange(0, ER_P)
    ks = tl.arange(0, K_P)
    rmask, emask = rows < T, er < ER
    code_offs = rows[:, None].to(tl.int64) * ER + er[None, :]
    code_mask = rmask[:, None] & emask[None, :]
    c1 = tl.zeros([BLOCK_T, ER_P], dtype=tl.float32)
    c3 = c1
    dmc = c1
    if HAS_L1:
        c1 = tl.load(C1 + code_offs, mask=code_mask, other=0.0)
        dc1 = tl.zeros([BLOCK_T, ER_P], dtype=tl.float32)
    if HAS_L3:
        c3 = tl.load(C3 + code_offs, mask=code_mask, other=0.0)
        dc3 = tl.zeros([BLOCK_T, ER_P], dtype=tl.float32)
    if HAS_OUT:
        dmc = tl.load(DMC + code_offs, mask=code_mask, other=0.0)
    dw_acc = tl.zeros([BLOCK_T, K_P], dtype=tl.float32)
    seed = 0
    if DROP:
        seed = tl.load(SEED)
    start, stop = _chunk(tl.program_id(1), tl.num_programs(1), tl.cdiv(I, BLOCK_I))
    for it in range(start, stop):
        cols = it * BLOCK_I + tl.arange(0, BLOCK_I)
        cmask = cols < I
        tile = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * I + cols[None, :]
        g = tl.load(G + offs, mask=tile, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=tile, other=0.0).to(tl.float32)
        dm = tl.load(DM + offs, mask=tile, other=0.0).to(tl.float32)
        w_offs = er[:, None] * I + cols[None, :]
        w_mask = emask[:, None] & cmask[None, :]
        b1 = tl.zeros([ER_P, BLOCK_I], dtype=tl.float32)
        b3 = b1
        a2 = b1
        if HAS_L1:
            b1 = tl.load(B1 + w_offs, mask=w_mask, other=0.0)
        if HAS_L3:
            b3 = tl.load(B3 + w_offs, mask=w_mask, other=0.0)
        if HAS_OUT:
            a2 = tl.load(A2 + w_offs, mask=w_mask, other=0.0)
        dg = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        du = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        for k in tl.static_range(K):
            e = tl.load(EXP + rows * K + k, mask=rmask, other=0)
            w = tl.load(W + rows * K + k, mask=rmask, other=0.0)
            sel = (er[None, :] // R) == e[:, None]
            dgk, duk, hd, dw, dmcm = _pair_grad_h(g, u, dm, c1, c3, dmc, b1, b3, a2, e, w, sel, rows, cols, k, seed,
                                                  I, p_drop, drop_scale, K, HAS_L1, HAS_L3, HAS_OUT, DROP, ACT,
                                                  DOT_PREC)
            dw_acc += tl.where(ks[None, :] == k, dw[:, None], 0.0)
            dg += dgk
            du += duk
            if HAS_L1:
                dc1 += tl.where(sel, tl.dot(dgk.to(b1.dtype), tl.trans(b1), input_precision=DOT_PREC), 0.0)
            if HAS_L3:
                dc3 += tl.where(sel, tl.dot(duk.to(b3.dtype), tl.trans(b3), input_precision=DOT_PREC), 0.0)
        tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=tile)
        tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=tile)
    if HAS_L1:
        tl.atomic_add(DC1 + code_offs, dc1, mask=code_mask)
    if HAS_L3:
        tl.atomic_add(DC3 + code_offs, dc3, mask=code_mask)
    tl.atomic_add(DW + rows[:, None] * K + ks[None, :], dw_acc, mask=rmask[:, None] & (ks[None, :] < K))


@triton.jit
def _pair_bwd_weights(G, U, C1, C3, B1, B3, A2, EXP, W, SEED, DM, DMC,
                      DB1, DB3, DA2,
                      T, I, ER, R, p_drop, drop_scale,
                      K: tl.constexpr, ER_P: tl.constexpr, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr,
                      HAS_OUT: tl.constexpr, DROP: tl.constexpr, ACT: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    """Weight gradients (B1, B3, A2). One program: one I tile, a chunk of token tiles; the [ER, BLOCK_I]
    sums stay in registers over the chunk and are added once."""
    cols = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    er = tl.arange(0, ER_P)
    cmask, emask = cols < I, er < ER
    w_offs = er[:, None] * I + cols[None, :]
    w_mask = emask[:, None] & cmask[None, :]
    b1 = tl.zeros([ER_P, BLOCK_I], dtype=tl.float32)
    b3 = b1
    a2 = b1
    if HAS_L1:
        b1 = tl.load(B1 + w_offs, mask=w_mask, other=0.0)
        db1 = tl.zeros([ER_P, BLOCK_I], dtype=tl.float32)
    if HAS_L3:
        b3 = tl.load(B3 + w_offs, mask=w_mask, other=0.0)
        db3 = tl.zeros([ER_P, BLOCK_I], dtype=tl.float32)
    if HAS_OUT:
        a2 = tl.load(A2 + w_offs, mask=w_mask, other=0.0)
        da2 = tl.zeros([ER_P, BLOCK_I], dtype=tl.float32)
    seed = 0
    if DROP:
        seed = tl.load(SEED)
    start, stop = _chunk(tl.program_id(1), tl.num_programs(1), tl.cdiv(T, BLOCK_T))
    for tt in range(start, stop):
        rows = tt * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        tile = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * I + cols[None, :]
        g = tl.load(G + offs, mask=tile, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=tile, other=0.0).to(tl.float32)
        dm = tl.load(DM + offs, mask=tile, other=0.0).to(tl.float32)
        code_offs = rows[:, None].to(tl.int64) * ER + er[None, :]
        code_mask = rmask[:, None] & emask[None, :]
        c1 = tl.zeros([BLOCK_T, ER_P], dtype=tl.float32)
        c3 = c1
        dmc = c1
        if HAS_L1:
            c1 = tl.load(C1 + code_offs, mask=code_mask, other=0.0)
        if HAS_L3:
            c3 = tl.load(C3 + code_offs, mask=code_mask, other=0.0)
        if HAS_OUT:
            dmc = tl.load(DMC + code_offs, mask=code_mask, other=0.0)
        for k in tl.static_range(K):
            e = tl.load(EXP + rows * K + k, mask=rmask, other=0)
            w = tl.load(W + rows * K + k, mask=rmask, other=0.0)
            sel = (er[None, :] // R) == e[:, None]
            dgk, duk, hd, dw, dmcm = _pair_grad_h(g, u, dm, c1, c3, dmc, b1, b3, a2, e, w, sel, rows, cols, k, seed,
                                                  I, p_drop, drop_scale, K, HAS_L1, HAS_L3, HAS_OUT, DROP, ACT,
                                                  DOT_PREC)
            if HAS_L1:
                c1m = tl.where(sel, c1, 0.0)
                db1 += tl.dot(tl.trans(c1m), dgk.to(c1m.dtype), input_precision=DOT_PREC)
            if HAS_L3:
                c3m = tl.where(sel, c3, 0.0)
                db3 += tl.dot(tl.trans(c3m), duk.to(c3m.dtype), input_precision=DOT_PREC)
            if HAS_OUT:
                wdmc = (dmcm * w[:, None]).to(a2.dtype)
                da2 += tl.dot(tl.trans(wdmc), hd.to(a2.dtype), input_precision=DOT_PREC)
    if HAS_L1:
        tl.atomic_add(DB1 + w_offs, db1, mask=w_mask)
    if HAS_L3:
        tl.atomic_add(DB3 + w_offs, db3, mask=w_mask)
    if HAS_OUT:
        tl.atomic_add(DA2 + w_offs, da2, mask=w_mask)


def _configs(rows):
    return [triton.Config({"BLOCK_T": bt, "BLOCK_I": bi}, num_warps=nw, num_stages=ns) for bt, bi, nw, ns in rows]


# Two tile classes: "small" for 16-bit operands with E*r <= 128 (the measured configuration), "large"
# for fp32 operands or wider codes, whose tiles need twice the shared memory (the small class's first
# config ran out of it in fp32 on an H200). The first config of each list is the default when
# autotuning is off.
_CONFIGS = {
    "small": {
        "fwd": _configs([(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]),
        "bwd_tokens": _configs([(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2)]),
        "bwd_weights": _configs([(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)]),
    },
    "large": {
        "fwd": _configs([(32, 32, 4, 1), (32, 64, 4, 1), (64, 32, 8, 1)]),
        "bwd_tokens": _configs([(32, 32, 4, 1), (32, 64, 8, 1)]),
        "bwd_weights": _configs([(32, 32, 4, 1), (64, 32, 8, 1)]),
    },
}
_KEY = ["I", "ER", "R"]
_ZEROED = {"fwd": ["MCODE"], "bwd_tokens": ["DC1", "DC3", "DW"], "bwd_weights": ["DB1", "DB3", "DA2"]}
_BODIES = {"fwd": _pair_fwd, "bwd_tokens": _pair_bwd_tokens, "bwd_weights": _pair_bwd_weights}

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton's interpreter (set before triton is imported) runs the kernels on CPU tensors, for tests."""

AUTOTUNE = os.environ.get("MIXLORA_FUSED_AUTOTUNE", "1") != "0"
"""Time the tile configs once per shape (the default); with MIXLORA_FUSED_AUTOTUNE=0 take the first
config (tests: many shapes, each tuned once, would spend minutes compiling)."""


def _tuned(kernel, configs, zeroed):
    if INTERPRETED:  # fixed small tiles (INTERPRETER_META): autotuning would time the interpreter
        return kernel
    return triton.autotune(configs if AUTOTUNE else configs[:1], key=_KEY, reset_to_zero=zeroed)(kernel)


KERNELS = {(cls, name): _tuned(_BODIES[name], configs, _ZEROED[name])
           for cls, lists in _CONFIGS.items() for name, configs in lists.items()}
"""(tile class, kernel name) -> launchable kernel."""


def tile_class(fp32: bool, er_padded: int) -> str:
    return "large" if fp32 or er_padded > 128 else "small"


INTERPRETER_META = {"BLOCK_T": 16, "BLOCK_I": 16}
INTERPRETER_SMS = 2
"""Multiprocessors to plan the grid for under the interpreter: small, so programs loop over chunks."""
