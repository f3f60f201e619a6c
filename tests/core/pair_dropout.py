"""The output-side dropout of the fused kernels: recover its keep mask and check it is a dropout."""

from __future__ import annotations

import torch


def keep_mask(seed: int, T: int, K: int, I: int, p: float, device) -> torch.Tensor:
    """The kernels' keep mask [T, K, I] for ``seed``: one expert of rank I whose A is the identity
    makes the down LoRA's code the dropped intermediate itself; rows t*K + k of a one-slot run
    draw the numbers of slot k of token t."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(T * K, I, generator=g).to(device)
    up = torch.randn(T * K, I, generator=g).to(device)
    eye = torch.eye(I, device=device)
    zeros = torch.zeros(T * K, 1, dtype=torch.long, device=device)
    ones = torch.ones(T * K, 1, device=device)
    seed_t = torch.full((1,), seed, dtype=torch.int64, device=device)
    _, code = torch.ops.mixlora_ds.pair_ffn(gate, up, None, None, None, None, eye, zeros, ones, seed_t, I, p, "silu")
    h = torch.nn.functional.silu(gate) * up
    keep = code != 0
    kept_ok = torch.allclose(code[keep], (h / (1 - p))[keep], rtol=1e-5, atol=1e-6)
    assert kept_ok, "kept values are not h / (1 - p)"
    return keep.view(T, K, I)


def check_statistics(keep_TKI: torch.Tensor, p: float) -> None:
    n = keep_TKI.numel()
    frac = keep_TKI.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma, f"keep fraction {frac:.4f} vs {1 - p} (sigma {sigma:.4f})"
    if keep_TKI.shape[1] > 1:  # slots of one token draw independent masks
        same = (keep_TKI[:, 0] == keep_TKI[:, 1]).float().mean().item()
        expect = p * p + (1 - p) ** 2
        assert abs(same - expect) < 0.05, f"slot masks agree on {same:.3f}, independent would be {expect:.3f}"
    a, b = keep_TKI[..., :-1].float().flatten(), keep_TKI[..., 1:].float().flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 0.05, f"neighbouring columns correlate ({corr:.3f})"
