#!/usr/bin/env python
"""Collective bandwidth between the GPUs of one host (what ZeRO's gradient and parameter traffic gets).

    torchrun --standalone --nproc_per_node 4 benchmarks/bench_collectives.py

Prints one JSON line per (collective, size): median time and bus bandwidth as nccl-tests defines it
(all-reduce: 2(n-1)/n x size / time; all-gather and reduce-scatter: (n-1)/n x size / time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="32,400", help="message sizes in MiB (bf16)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    n, rank = dist.get_world_size(), dist.get_rank()
    for mb in [int(s) for s in args.sizes_mb.split(",")]:
        numel = mb * 2**20 // 2 // n * n  # divisible by the GPU count, for reduce-scatter
        x = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(numel * n, dtype=torch.bfloat16, device="cuda")
        shard = torch.empty(numel // n, dtype=torch.bfloat16, device="cuda")
        ops = {
            "all_reduce": (lambda: dist.all_reduce(x), 2 * (n - 1) / n),
            "all_gather": (lambda: dist.all_gather_into_tensor(out, x), (n - 1)),
            "reduce_scatter": (lambda: dist.reduce_scatter_tensor(shard, x), (n - 1) / n),
        }
        for name, (op, factor) in ops.items():
            op()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                op()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            if rank == 0:
                print(json.dumps({"op": name, "gpus": n, "mib": mb, "ms": round(t * 1e3, 2),
                                  "busbw_gb_s": round(factor * numel * 2 / t / 1e9, 1)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
