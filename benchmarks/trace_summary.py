#!/usr/bin/env python
"""Where a profiled training step's GPU time goes, from the Chrome traces ``bench_zero.py --trace`` writes.

For each trace: the time span of the GPU work, how much of it the compute stream (the stream with
the most non-NCCL kernel time) is busy, how much NCCL kernels and copies on side streams (gathers by
copy engine) run, and how much of that time the compute stream sits idle (communication that
compute does not hide). The compute stream's largest idle gaps are listed with the communication
that ran during them (NCCL kernels by kind, "copy" for side-stream copies): a gap covered by a
gather is a gather that was not hidden; an uncovered gap is the device waiting for the host.
With compiled layers, the host's time from one layer's compiled call to the next (median, forward
and backward) shows what runs between layers on the host: hooks, gradient bookkeeping, launches.

    python benchmarks/trace_summary.py traces/trace_zero3_mixlora_w2_r0.json.gz [more traces ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
COMPILED_FORWARD, COMPILED_BACKWARD = "Torch-Compiled Region", "CompiledFunctionBackward"


def load_events(path: str) -> list[dict]:
    """The trace's complete events (``ph`` "X") of positive duration."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0]


def host_us_between_layers(events: list[dict], name_prefix: str) -> float | None:
    """Median host time from the end of one compiled layer call (events named ``name_prefix``...)
    to the start of the next; None without two such calls."""
    calls = sorted((e for e in events if e.get("cat") == "cpu_op" and e["name"].startswith(name_prefix)),
                   key=lambda e: e["ts"])
    between = sorted(b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(calls, calls[1:]))
    return round(between[len(between) // 2], 1) if between else None


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersect(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two sorted, disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def spans(events: list[dict]) -> list[tuple[float, float]]:
    return [(e["ts"], e["ts"] + e["dur"]) for e in events]


def is_nccl(e: dict) -> bool:
    return "nccl" in e["name"].lower()


def summarize(path: str, steps: int, gaps: int) -> dict:
    everything = load_events(path)
    events = [e for e in everything if e.get("cat") in GPU_CATS]
    if not events:
        raise SystemExit(f"{path}: no GPU events (a CPU run, or the profiler saw no CUDA activity)")
    by_stream: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        by_stream[e["args"].get("stream", -1)].append(e)
    compute_stream = max(by_stream, key=lambda s: sum(e["dur"] for e in by_stream[s] if not is_nccl(e)))
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    compute = union(spans(by_stream[compute_stream]))
    nccl_events = [e for e in events if is_nccl(e)]
    nccl = union(spans(nccl_events))
    idle = complement(compute, start, end)
    copy_events = [e for e in events if e["cat"] == "gpu_memcpy" and e["args"].get("stream") != compute_stream]
    side_copies = union(spans(copy_events))
    nccl_exposed = intersect(nccl, idle)
    uncovered = intersect(idle, complement(union(spans(nccl_events + copy_events)), start, end))
    kinds: dict[str, float] = defaultdict(float)
    for e in nccl_events:
        kinds[nccl_kind(e["name"])] += e["dur"]

    def per_step(us: float) -> float:
        return round(us / steps / 1e3, 2)

    biggest = sorted(idle, key=lambda g: g[0] - g[1])[:gaps]
    gap_rows = []
    for a, b in sorted(biggest):
        during = sorted({nccl_kind(e["name"]) if is_nccl(e) else "copy" for e in nccl_events + copy_events
                         if e["ts"] < b and e["ts"] + e["dur"] > a})
        gap_rows.append({"at_ms": round((a - start) / 1e3, 2), "ms": round((b - a) / 1e3, 3), "during": during})
    return {
        "trace": path, "steps": steps, "compute_stream": compute_stream,
        "span_ms_per_step": per_step(end - start),
        "compute_busy_ms_per_step": per_step(length(compute)),
        "compute_kernel_ms_per_step": per_step(sum(e["dur"] for e in by_stream[compute_stream] if not is_nccl(e))),
        "compute_idle_ms_per_step": per_step(length(idle)),
        "nccl_ms_per_step": per_step(length(nccl)),
        "nccl_by_kind_ms_per_step": {k: per_step(v) for k, v in sorted(kinds.items())},
        "nccl_while_compute_idle_ms_per_step": per_step(length(nccl_exposed)),
        "side_stream_copies_ms_per_step": per_step(length(side_copies)),
        "side_stream_copies_while_compute_idle_ms_per_step": per_step(length(intersect(side_copies, idle))),
        "compute_idle_without_communication_ms_per_step": per_step(length(uncovered)),
        "idle_gaps": len(idle),
        "host_us_between_compiled_layers": {"forward": host_us_between_layers(everything, COMPILED_FORWARD),
                                            "backward": host_us_between_layers(everything, COMPILED_BACKWARD)},
        "largest_idle_gaps": gap_rows,
    }


def complement(intervals: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    out, t = [], start
    for a, b in intervals:
        if a > t:
            out.append((t, a))
        t = max(t, b)
    if t < end:
        out.append((t, end))
    return out


def nccl_kind(name: str) -> str:
    for kind in ("AllGather", "ReduceScatter", "AllReduce", "Broadcast", "Reduce", "SendRecv"):
        if kind.lower() in name.lower():
            return kind
    return name[:40]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+")
    p.add_argument("--steps", type=int, default=2, help="training steps the trace holds (bench_zero profiles 2)")
    p.add_argument("--gaps", type=int, default=12, help="how many of the largest idle gaps to list")
    args = p.parse_args()
    for path in args.traces:
        print(json.dumps(summarize(path, args.steps, args.gaps), indent=1))


if __name__ == "__main__":
    main()
