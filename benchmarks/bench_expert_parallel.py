"""Expert parallelism, measured: bytes the all-to-all moves (CPU ranks) and the owner-side compute (one GPU).

    # bytes per MoE layer, counted by the dispatcher on real gloo ranks, against the cost model
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_expert_parallel.py bytes --experts 8 --rank 16
    torchrun --standalone --nproc_per_node 4 benchmarks/bench_expert_parallel.py bytes --experts 64 --rank 32
    # the compute side of the crossover: one MoE block's forward+backward on one GPU, as without EP and
    # as an EP owner at EP 2, 4, 8 (the rows it receives, computed from uniform routing of P x T tokens)
    python benchmarks/bench_expert_parallel.py owner --experts 8 --rank 16

The ``bytes`` mode builds one MixLoRA block of hidden size 4096 (the bytes do not depend on the FFN's
intermediate size, so it is kept small to run on CPU ranks), routes T tokens per rank with a random
router (near uniform, as the balance loss aims for) and runs forward and backward once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_block(hidden: int, intermediate: int, experts: int, rank: int, top_k: int, dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from mixlora_ds import MixLoraConfig
    from mixlora_ds.model.families import family_for
    from mixlora_ds.model.moe import MixLoraMoeBlock

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate)
    torch.manual_seed(0)
    with torch.device(device):
        mlp = LlamaMLP(cfg).to(dtype)
    for p in mlp.parameters():
        p.requires_grad_(False)
    mc = MixLoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, num_experts=experts, top_k=top_k,
                       target_modules=["gate_proj", "up_proj", "down_proj"])
    block = MixLoraMoeBlock(mlp, family_for("llama"), mc, hidden, "silu", dtype).to(device)
    with torch.no_grad():
        for stack in block.experts.values():
            stack.lora_B.normal_(0, 0.01)
    return block


def run_bytes(args) -> None:
    import torch.distributed as tdist

    from mixlora_ds.parallel.ep_cost import estimate
    from mixlora_ds.parallel.expert_parallel import ExpertParallel

    tdist.init_process_group("gloo")
    world, rank = tdist.get_world_size(), tdist.get_rank()
    block = build_block(args.hidden, 256, args.experts, args.rank, args.top_k, torch.float32, "cpu")
    ep = ExpertParallel.create(args.ep or world)
    ep.shard(block)
    torch.manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    t0 = time.perf_counter()
    block(x.unsqueeze(0)).float().pow(2).mean().backward()
    seconds = time.perf_counter() - t0
    # Sent bytes are counted in fp32 here; scale the activation part to bf16 for the 7B prediction.
    counted = torch.tensor([float(ep.stats.sent_bytes), float(ep.stats.received[0])])
    every = [torch.zeros_like(counted) for _ in range(world)]
    tdist.all_gather(every, counted)
    if rank == 0:
        model = estimate(args.hidden, 11008, 1, args.experts, args.rank, args.top_k, args.tokens, args.ep or world,
                         world, activation_bytes=4)
        sent = [float(c[0]) for c in every]
        print(json.dumps({
            "mode": "bytes", "world": world, "ep": args.ep or world, "experts": args.experts, "rank": args.rank,
            "top_k": args.top_k, "tokens_per_rank": args.tokens, "hidden": args.hidden,
            "counted_bytes_per_rank_fp32": sent, "model_bytes_per_rank_fp32": model.bytes_per_layer,
            "received_rows": [float(c[1]) for c in every], "model_received_rows": args.tokens * model.visits_per_token,
            "seconds": seconds}))
    tdist.destroy_process_group()


def run_owner(args) -> None:
    from mixlora_ds.parallel.expert_parallel import plan_visits
    from mixlora_ds.model.dispatch import RoutedTokens

    device, dtype = "cuda", torch.bfloat16
    results = []
    for ep in [1, *args.ep_sizes]:
        block = build_block(args.hidden, args.intermediate, args.experts, args.rank, args.top_k, dtype, device)
        if ep > 1:
            block.keep_experts(0, args.experts // ep)
        torch.manual_seed(0)
        # The tokens of all ep ranks, routed; rank 0 computes the rows that visit it.
        xs = torch.randn(ep * args.tokens, args.hidden, device=device, dtype=dtype)
        routing = block.router(xs)
        v = plan_visits(routing.expert_TK, routing.weight_TK, ep, args.experts // ep)
        mine = v.rank_V == 0
        x = xs[v.token_V[mine]].detach().clone().requires_grad_()
        tokens = RoutedTokens(x, v.expert_VK[mine], v.weight_VK[mine].detach())
        block.compiled = args.compile

        def step():
            y = block.expert_compute(tokens)
            y.float().pow(2).mean().backward()

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        results.append({"ep": ep, "rows": int(x.shape[0]), "rows_per_token": x.shape[0] / args.tokens,
                        "ms": statistics.median(times)})
        del block, x, tokens
        torch.cuda.empty_cache()
    base = results[0]["ms"]
    for r in results:
        r["x_no_ep"] = r["ms"] / base
    print(json.dumps({"mode": "owner", "device": torch.cuda.get_device_name(), "experts": args.experts,
                      "rank": args.rank, "top_k": args.top_k, "tokens": args.tokens, "compile": args.compile,
                      "results": results}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["bytes", "owner"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank (micro-batch 4 x 512)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--ep", type=int, default=None, help="bytes mode: EP size (default: the world size)")
    p.add_argument("--ep-sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--compile", action="store_true", help="owner mode: the compiled dense per-pair path")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    run_bytes(args) if args.mode == "bytes" else run_owner(args)


if __name__ == "__main__":
    main()
