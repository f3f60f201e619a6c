"""When expert parallelism pays: bytes moved, extra compute and memory saved, for one configuration.

Expert parallelism (EP) over P ranks trades three costs for one saving. Per MoE layer and micro-step,
on each rank, with T tokens, E experts of rank r, top-k routing, hidden H, intermediate I, uniform
routing (the load-balance loss aims at it):

- visits: a token goes once to each rank owning one of its experts, v = P (1 - C(E - E/P, k) / C(E, k))
  ranks on average (drawing k of E experts without replacement); (P-1)/P of them are remote.
- bytes moved: forward sends each remote visit's row (H activations) and route (2k fp32) out and one
  H row back; backward sends their gradients the other way; a forward recomputed under activation
  checkpointing sends again. Plus P row counts per forward.
- extra compute: the owner runs the frozen FFN (2*3*H*I FLOPs a token forward, as much again in
  backward for the input gradient) once per visit instead of once per token: (v - 1) times more.
- memory saved: each rank holds E/P experts of 3 r (H + I) parameters each instead of all E. With
  experts replicated under a ZeRO-1/2 engine in bf16 a rank keeps 2 bytes (compute copy) per
  parameter plus 2 + 12 bytes (gradient, fp32 master and AdamW moments) partitioned over the world;
  an EP owner keeps 16 bytes per owned parameter (fp32 value, gradient, moments).
- saving in communication: expert gradients are reduced over the W/P ranks that own the same
  experts instead of over all W (per optimizer step, not per micro-step).

The figures are estimates to decide with, not measurements: ``benchmarks/bench_expert_parallel.py``
counts the bytes of real runs and times the owner-side block on a GPU (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb


@dataclass
class ExpertParallelCost:
    ep_size: int
    visits_per_token: float
    bytes_per_layer: float
    """Bytes one rank sends to others per MoE layer and micro-step (forward + backward [+ recompute])."""
    bytes_per_step: float
    """The same over all layers and the micro-steps of one optimizer step."""
    extra_flops_per_step: float
    """FLOPs added per rank and optimizer step by running the frozen FFN once per visit."""
    expert_params: int
    """Expert parameters of the whole model (all layers, all experts)."""
    memory_saved_bytes: float
    """Per rank: replicated experts under a ZeRO-1/2 bf16 engine minus the experts EP leaves it."""
    grad_sync_bytes_saved: float
    """Per rank and optimizer step: expert-gradient traffic no longer reduced over all ranks."""
    comm_seconds: float
    extra_compute_seconds: float
    saved_seconds: float

    @property
    def step_seconds_added(self) -> float:
        """Estimated time EP adds to an optimizer step (negative: it saves time)."""
        return self.comm_seconds + self.extra_compute_seconds - self.saved_seconds


def expected_visits(num_experts: int, top_k: int, ep_size: int) -> float:
    """Average number of distinct EP ranks owning one of a token's top-k experts."""
    per_rank = num_experts // ep_size
    k = min(top_k, num_experts)
    return ep_size * (1 - comb(num_experts - per_rank, k) / comb(num_experts, k))


def estimate(hidden: int, intermediate: int, num_layers: int, num_experts: int, rank: int, top_k: int,
             tokens_per_rank: int, ep_size: int, world_size: int | None = None, grad_accum: int = 1,
             activation_bytes: int = 2, checkpointing: bool = False, link_gbps: float = 100.0,
             tflops: float = 400.0) -> ExpertParallelCost:
    """The cost of EP over ``ep_size`` ranks (``world_size``: all ranks, default ``ep_size``) for
    ``tokens_per_rank`` tokens per micro-batch. ``link_gbps``: all-to-all bandwidth per rank in GB/s;
    ``tflops``: the FLOP rate the frozen FFN achieves."""
    world = world_size or ep_size
    P, T, H, I, E, k = ep_size, tokens_per_rank, hidden, intermediate, num_experts, top_k
    v = expected_visits(E, k, P)
    remote = T * v * (P - 1) / P
    forward = remote * (2 * H * activation_bytes + 2 * k * 4) + P * 8  # row out + row back, route, counts
    backward = remote * (2 * H * activation_bytes + 2 * k * 4)
    per_layer = forward * (2 if checkpointing else 1) + backward
    micro = num_layers * grad_accum
    frozen_ffn_flops = 2 * 3 * H * I  # per token, forward; the backward needs only the input gradient
    extra = (v - 1) * T * frozen_ffn_flops * (3 if checkpointing else 2) * micro
    per_expert = 3 * rank * (H + I)
    n = per_expert * E * num_layers
    replicated = 2 * n + 14 * n / world
    owned = 16 * n / P
    # ZeRO-2 reduce-scatters bf16 gradients and all-gathers bf16 parameters over all W ranks; EP
    # all-reduces fp32 gradients of the owned experts over W/P ranks.
    edp = world // P
    before = 2 * (2 * n) * (world - 1) / world
    after = 2 * (4 * n / P) * (edp - 1) / edp if edp > 1 else 0.0
    bw = link_gbps * 1e9
    return ExpertParallelCost(
        ep_size=P, visits_per_token=v, bytes_per_layer=per_layer, bytes_per_step=per_layer * micro,
        extra_flops_per_step=extra, expert_params=n, memory_saved_bytes=replicated - owned,
        grad_sync_bytes_saved=before - after, comm_seconds=per_layer * micro / bw,
        extra_compute_seconds=extra / (tflops * 1e12), saved_seconds=(before - after) / bw)


def describe(cost: ExpertParallelCost) -> str:
    gb = 1e9
    verdict = "slower" if cost.step_seconds_added > 0 else "faster"
    memory = "less" if cost.memory_saved_bytes >= 0 else "more"
    return (f"expert parallelism over {cost.ep_size} ranks (estimate): a token visits {cost.visits_per_token:.2f} "
            f"ranks; {cost.bytes_per_step / gb:.3f} GB sent per rank and step, {cost.extra_flops_per_step / 1e12:.2f} "
            f"TFLOP recomputed frozen FFN, {cost.grad_sync_bytes_saved / gb:.3f} GB less gradient traffic; "
            f"{abs(cost.step_seconds_added) * 1e3:.1f} ms {verdict} per step; "
            f"{abs(cost.memory_saved_bytes) / gb:.3f} GB {memory} memory per rank")


def describe_for_run(plan, expert_parallel) -> str:
    """The estimate for a planned run (its model, adapter, batch and precision), for the training log."""
    hf, ad, cfg = plan.hf_config, plan.cfg.adapter, plan.cfg
    tokens = cfg.batch.micro_batch_size * (plan.seq_len or 512)
    on_gpu = plan.device == "cuda"
    cost = estimate(hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, ad.num_experts, ad.r, ad.top_k,
                    tokens, expert_parallel.layout.ep_size, plan.world_size, plan.grad_accum,
                    activation_bytes=2 if plan.precision == "bf16" else 4,
                    checkpointing=cfg.model.gradient_checkpointing,
                    link_gbps=100.0 if on_gpu else 5.0, tflops=400.0 if on_gpu else 0.05)
    assumed = "100 GB/s links, 400 TFLOP/s" if on_gpu else "5 GB/s, 0.05 TFLOP/s (CPU)"
    return describe(cost) + f" (assumed {assumed}; README: Expert parallelism)"
