"""Random problems for the fused per-pair kernels and their float64 per-expert reference.

Shared by the interpreter probe (CPU) and the GPU tests. The reference loops over slots and experts
with boolean masks in float64; it shares no code with the kernels or ``dense_pair_math``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTS = {"silu": F.silu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}


def make_problem(T, K, E, r, D, I, *, dtype=torch.float32, device="cpu", seed=0, missing=(), unused_expert=None,
                 zero_slots=True):
    """Leaves (float64, requiring grad) of one random problem: x, gate, up, the three LoRAs (A, B) unless
    named in ``missing`` ("l1", "l3", "out"), routing (expert indices avoiding ``unused_expert``; some
    slots weighted 0 like top-p padding), and the dtype/device the kernels run in."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    p = {"x": rnd(T, D), "gate": rnd(T, I), "up": rnd(T, I), "dtype": dtype, "device": device, "E": E}
    for name, (i, o) in {"l1": (D, I), "l3": (D, I), "out": (I, D)}.items():
        p[name] = None if name in missing else (rnd(E * r, i, scale=1 / math.sqrt(i)), rnd(E * r, o, scale=0.5))
    choices = [e for e in range(E) if e != unused_expert]
    idx = torch.randint(0, len(choices), (T, K), generator=g)
    p["expert_TK"] = torch.tensor(choices)[idx]
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    if zero_slots and K > 1:
        w[::3, -1] = 0.0  # padded slots contribute nothing
    p["weight_TK"] = w.requires_grad_()
    return p


def leaves(p) -> list[torch.Tensor]:
    out = [p["x"], p["gate"], p["up"]]
    for name in ("l1", "l3", "out"):
        if p[name] is not None:
            out += list(p[name])
    return out + [p["weight_TK"]]


def reference(p, act: str, keep_TKI=None, p_drop: float = 0.0):
    """(mixed [T, I], delta [T, D] or None) in float64, expert by expert; ``keep_TKI`` is the output
    dropout's keep mask (scaled by 1 / (1 - p_drop))."""
    x, K = p["x"], p["expert_TK"].shape[1]
    E = p["E"]
    mixed = torch.zeros_like(p["gate"])
    delta = torch.zeros_like(x) if p["out"] is not None else None
    for k in range(K):
        for e in range(E):
            rows = (p["expert_TK"][:, k] == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            pre = []
            for name, dense in (("l1", p["gate"]), ("l3", p["up"])):
                v = dense[rows]
                if p[name] is not None:
                    A, B = p[name]
                    r = A.shape[0] // E
                    v = v + x[rows] @ A[e * r:(e + 1) * r].t() @ B[e * r:(e + 1) * r]
                pre.append(v)
            h = ACTS[act](pre[0]) * pre[1]
            w = p["weight_TK"][rows, k].unsqueeze(1)
            mixed = mixed.index_add(0, rows, w * h)
            if delta is not None:
                A, B = p["out"]
                r = A.shape[0] // E
                hd = h if keep_TKI is None else h * keep_TKI[rows, k] / (1 - p_drop)
                delta = delta.index_add(0, rows, w * (hd @ A[e * r:(e + 1) * r].t() @ B[e * r:(e + 1) * r]))
    return mixed, delta


def run_fused(p, act: str, p_drop: float = 0.0):
    """Outputs of ``fused_pair_math`` (float64 copies) for the problem, in its dtype and device."""
    from mixlora_ds.model.kernels.pair_op import fused_pair_math

    cast = lambda t: t.to(device=p["device"], dtype=p["dtype"])  # noqa: E731
    lora = lambda name, drop: None if p[name] is None else (cast(p[name][0]), cast(p[name][1]), drop)  # noqa: E731
    out = fused_pair_math(cast(p["x"]), p["expert_TK"].to(p["device"]),
                          p["weight_TK"].to(device=p["device"], dtype=torch.float32),
                          [cast(p["gate"]), cast(p["up"])], [lora("l1", 0.0), lora("l3", 0.0)], lora("out", p_drop),
                          True, act, num_experts=p["E"])
    return out


def grads_of(outputs, p, seed: int = 5):
    """Gradients of a random linear function of the outputs w.r.t. every leaf, in float64."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        if o is None:
            continue
        probe = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)
        loss = loss + (o.double() * probe).sum()
    return [None if t is None else t.double().cpu() for t in torch.autograd.grad(loss, leaves(p), allow_unused=True)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(p, act: str, tol: float, p_drop: float = 0.0, keep_TKI=None):
    """Assert the fused outputs and every gradient match the reference within ``tol`` (relative norm)."""
    fused = run_fused(p, act, p_drop)
    ref = reference(p, act, keep_TKI, p_drop)
    ref = [o for o in ref if o is not None]
    assert len(fused) == len(ref)
    errors = {f"out{i}": rel_err(f, r) for i, (f, r) in enumerate(zip(fused, ref))}
    names = ["x", "gate", "up"] + [f"{n}.{ab}" for n in ("l1", "l3", "out") if p[n] is not None for ab in "AB"] + ["w"]
    for name, gf, gr in zip(names, grads_of(fused, p), grads_of(ref, p)):
        if gf is None or gr is None:  # an unused input (x without input LoRAs) gets no gradient
            assert gf is None and gr is None, name
            continue
        errors[f"d{name}"] = rel_err(gf, gr)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors
