"""The router's losses and statistics over all layers, as the trainer computes them after every
micro-batch's forward: the load-balance loss (forward and backward), the switch z-loss, and the
routing statistics. Their tensors are small ([tokens, experts] per layer), so what they cost is the
number of operators the host dispatches (each one a kernel launch on a GPU), which this counts.

    python benchmarks/bench_router_losses.py                       # 7B shape: 32 layers, 4 x 512 tokens
    python benchmarks/bench_router_losses.py --layers 2 --tokens 64 --repeats 3   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixlora_ds.model.aux_loss import load_balance_loss, router_z_loss
from mixlora_ds.model.router import switch_routing, top_k_routing
from mixlora_ds.model.stats import statistics_of


class CountOps(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it (backward included), views apart (a view
    launches nothing)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def routings_for(args, device):
    """One routing per layer from random logits; its logits and probabilities are leaves, so each
    repeat runs the losses' own backward (the router's is the layer's)."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(args.layers):
        logits = torch.randn(args.tokens, args.experts, device=device, generator=g)
        if args.strategy == "switch":
            r = switch_routing(logits, args.capacity, args.seq)
        else:
            r = top_k_routing(logits, args.top_k)
        r.logits_TE.requires_grad_()
        r.probs_TE.requires_grad_()
        out.append(r)
    return out


def step(routings, mask, z_loss: bool):
    loss = load_balance_loss(routings, mask)
    if z_loss:
        loss = loss + router_z_loss(routings, mask)
    loss.backward()
    statistics_of(routings, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (batch x sequence)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--strategy", default="top-k", choices=["top-k", "switch"])
    ap.add_argument("--capacity", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    routings = routings_for(args, device)
    mask = (torch.rand(args.tokens // args.seq, args.seq, device=device) > 0.1).float()
    z_loss = args.strategy == "switch"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(routings, mask, z_loss)  # warm-up
    with CountOps() as counted:
        step(routings, mask, z_loss)
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step(routings, mask, z_loss)
        sync()
        times.append(time.perf_counter() - t0)
    print(f"device {device}; torch {torch.__version__}; {args.layers} layers, {args.tokens} tokens, "
          f"{args.experts} experts, {args.strategy}")
    print(f"operators per micro-batch, views apart: {sum(counted.ops.values())} "
          f"({', '.join(f'{k} {v}' for k, v in counted.ops.most_common(6))}); views: {counted.views}")
    print(f"host time per micro-batch: median {statistics.median(times) * 1e3:.2f} ms over {args.repeats}")


if __name__ == "__main__":
    main()
