"""The table of README.md, "Expert parallelism": what the cost model (``mixlora_ds.parallel.ep_cost``)
predicts for expert parallelism on LLaMA-shaped bases, per configuration of experts and EP size.

    python benchmarks/ep_cost_table.py                  # the README table (markdown)
    python benchmarks/ep_cost_table.py --tokens 4096 --world 16 --link-gbps 25

Estimates, not measurements: BENCHMARKS.md, "Expert parallelism", holds what was counted and timed.
"""

from __future__ import annotations

import argparse

from mixlora_ds.parallel.ep_cost import estimate

SHAPES = {"7B": (4096, 11008, 32), "70B": (8192, 28672, 80)}
# (base, experts, rank, top-k): the paper's setting, then more and larger experts.
CONFIGS = [("7B", 8, 16, 2), ("7B", 64, 32, 2), ("7B", 64, 64, 2), ("7B", 256, 64, 2), ("70B", 8, 16, 2),
           ("70B", 64, 64, 2)]


def rows(tokens: int, world: int, link_gbps: float, slow_link_gbps: float, tflops: float):
    for base, experts, rank, top_k in CONFIGS:
        hidden, intermediate, layers = SHAPES[base]
        for ep in (2, 4, 8):
            if ep > world or experts % ep:
                continue
            fast, slow = (estimate(hidden, intermediate, layers, experts, rank, top_k, tokens, ep, world,
                                   link_gbps=bw, tflops=tflops) for bw in (link_gbps, slow_link_gbps))
            yield base, experts, rank, top_k, ep, fast, slow


def markdown(tokens: int, world: int, link_gbps: float, slow_link_gbps: float, tflops: float) -> str:
    gb = 1e9
    out = [f"| base | experts x rank, top-k | adapter params | EP | visits per token | GB sent per rank and step "
           f"| recomputed TFLOP | ms per step, {link_gbps:g} GB/s | ms per step, {slow_link_gbps:g} GB/s "
           f"| memory per rank | verdict |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for base, experts, rank, top_k, ep, fast, slow in rows(tokens, world, link_gbps, slow_link_gbps, tflops):
        memory = -fast.memory_saved_bytes / gb
        if fast.step_seconds_added < 0 or fast.memory_saved_bytes > 0:
            verdict = "faster" if fast.step_seconds_added < 0 else "slower, saves memory"
            if fast.step_seconds_added < 0 and fast.memory_saved_bytes > 0:
                verdict = "faster, saves memory"
        else:
            verdict = "slower, more memory"
        out.append(f"| {base} | {experts} x r{rank}, top-{top_k} | {fast.expert_params / 1e9:.2f} B | {ep} "
                   f"| {fast.visits_per_token:.2f} | {fast.bytes_per_step / gb:.2f} "
                   f"| {fast.extra_flops_per_step / 1e12:.1f} | {fast.step_seconds_added * 1e3:+.0f} "
                   f"| {slow.step_seconds_added * 1e3:+.0f} | {memory:+.1f} GB | {verdict} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per micro-step (4 x 512)")
    p.add_argument("--world", type=int, default=8, help="ranks in all (data-parallel x expert-parallel)")
    p.add_argument("--link-gbps", type=float, default=100.0, help="all-to-all GB/s per rank inside a node")
    p.add_argument("--slow-link-gbps", type=float, default=25.0, help="all-to-all GB/s per rank across nodes")
    p.add_argument("--tflops", type=float, default=400.0, help="bf16 TFLOP/s the frozen FFN achieves")
    a = p.parse_args()
    print(markdown(a.tokens, a.world, a.link_gbps, a.slow_link_gbps, a.tflops))


if __name__ == "__main__":
    main()
