"""The element-wise passes of ``triton_pair.py`` in PyTorch: the same maths and the same in-place
contract, for CPU tensors, dtypes the kernels do not take (float64), and machines without Triton.

Sums run in fp32 for 16-bit inputs (float64 kept). The output-side dropout draws its keep mask from a
``torch.Generator`` seeded with the seed tensor, so forward and backward agree; it is not the
kernels' Philox stream, so a CPU run and a GPU run drop different elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


def _act(g: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(g) if act == "silu" else F.gelu(g, approximate="tanh")


def _act_and_slope(g: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    if act == "silu":
        sig = torch.sigmoid(g)
        return g * sig, sig * (1 + g * (1 - sig))
    s2 = torch.sigmoid(2 * _GELU_C * (g + 0.044715 * g**3))  # (1 + tanh z) / 2
    return g * s2, s2 + 2 * g * s2 * (1 - s2) * _GELU_C * (1 + 3 * 0.044715 * g * g)


def _pre(G, U, DG, DU, K: int, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair [T, K, I]: the frozen pre-activations plus each slot's expert delta."""
    T, I = G.shape
    g = G.to(acc).unsqueeze(1).expand(T, K, I)
    u = U.to(acc).unsqueeze(1).expand(T, K, I)
    if DG is not None:
        g = g + DG.view(T, K, I).to(acc)
    if DU is not None:
        u = u + DU.view(T, K, I).to(acc)
    return g, u


def _keep(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen, device=device) >= p


def forward(G, U, DG, DU, W, seed, mixed, HD, p: float, act: str, K: int) -> None:
    acc = torch.promote_types(G.dtype, torch.float32)
    g, u = _pre(G, U, DG, DU, K, acc)
    h = _act(g, act) * u
    mixed.copy_((h * W.to(acc).unsqueeze(-1)).sum(1))
    if HD is not None:
        if p > 0:
            h = torch.where(_keep(seed, h.shape, p, h.device), h / (1 - p), 0.0)
        HD.copy_(h.reshape(HD.shape))


def backward(G, U, DG, DU, DM, Q, W, seed, dgate, dup, dw_part, p: float, act: str, K: int) -> None:
    T, I = G.shape
    acc = torch.promote_types(G.dtype, torch.float32)
    g, u = _pre(G, U, DG, DU, K, acc)
    a, slope = _act_and_slope(g, act)
    h = a * u
    dm = DM.to(acc).unsqueeze(1)
    dw = (dm * h).sum(-1)
    dh = dm.expand(T, K, I)
    if Q is not None:
        q = Q.view(T, K, I).to(acc)
        if p > 0:
            keep = _keep(seed, h.shape, p, h.device)
            h = torch.where(keep, h / (1 - p), 0.0)
            dw = dw + (h * q).sum(-1)
            q = torch.where(keep, q / (1 - p), 0.0)
        else:
            dw = dw + (h * q).sum(-1)
        dh = dh + q
        Q.copy_(h.reshape(Q.shape))
    dh = dh * W.to(acc).unsqueeze(-1)
    dg, du = dh * u * slope, dh * a
    dgate.copy_(dg.sum(1))
    dup.copy_(du.sum(1))
    if DG is not None:
        DG.copy_(dg.reshape(DG.shape))
    if DU is not None:
        DU.copy_(du.reshape(DU.shape))
    dw_part.copy_(dw.unsqueeze(0))
