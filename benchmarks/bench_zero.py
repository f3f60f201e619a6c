#!/usr/bin/env python
"""Training-step throughput of LoRA-style adapters on a frozen base: plain PyTorch vs DeepSpeed ZeRO-2/3.

Measures what the training loop ships (``mixlora_ds.train.build.build_model`` + ``deepspeed.initialize``
+ forward/backward/step) on a random LLaMA-2-7B-shaped bf16 model, for the paper's MixLoRA config and
a LoRA r=80 baseline, and reports per-GPU tokens/s and peak memory as JSON lines.

One case (under a launcher, one process per GPU):
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_zero.py run --case zero3 --adapter mixlora
A sweep (spawns one launcher per case and GPU count, prints a table, appends JSON lines to --out):
    python benchmarks/bench_zero.py sweep --gpus 1,2,4 --cases plain,zero2,zero3 \
        --adapters lora80,mixlora --out bench_zero.jsonl
CPU smoke test (tiny model, fp32, gloo):
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/bench_zero.py sweep --model tiny --gpus 1,2 \
        --cases plain,zero2,zero3 --adapters lora80,mixlora --steps 2 --warmup 1 --micro 1 --seq 64

Cases (the shipped configs, and levers on top of them in ``VARIANTS``):
    plain              one process, no DeepSpeed, torch AdamW (the reference point)
    zero2              ZeRO-2 as shipped in ds_configs/zero2_bf16.json (frozen base replicated)
    zero3              ZeRO-3 as shipped in ds_configs/zero3_bf16.json, the frozen base sharded per
                       decoder layer by mixlora_ds (the default ``deepspeed.zero3_impl: mixlora_ds``),
                       gathered by copy engines on one host's GPUs (``zero3_gather_transport: auto``)
    zero3_deepspeed    the same config on DeepSpeed's own stage-3 engine (``zero3_impl: deepspeed``,
                       one gather per decoder layer: ``zero3_gather: layer``)
    zero3_no_prefetch  zero3 gathering each layer only when it is reached (what prefetch buys)
    zero3_prefetch2    zero3 starting each layer's gather two layers ahead instead of one
    zero3_nccl         zero3 gathering by NCCL all-gathers (on SMs) instead of copy engines
    zero2_ds_defaults  zero2 with DeepSpeed's usual overflow check, overlap_comm, contiguous gradients
    zero1              zero2's settings at stage 1
    zero2_overlap      zero2 reducing gradients on a side stream, overlapped with backward
    zero3_deepspeed_ds_defaults  zero3_deepspeed with DeepSpeed's usual overlap, buckets, persistence
                       and linear
    zero3_deepspeed_prefetch     zero3_deepspeed prefetching about one decoder layer ahead
    ddp                plain PyTorch DistributedDataParallel, one process per GPU (data parallel
                       without DeepSpeed, for comparison)

Peak memory is what the caching allocator handed out, plus, with copy-engine gathers, the shards
in symmetric memory where the allocator does not count them. ``--trace DIR`` writes ranks 0 and 1's timelines of two
profiled steps; ``benchmarks/trace_summary.py`` says where their GPU time went.

Python's garbage collection runs as the training loop runs it (``--gc-every``, the training
config's ``gc_every_steps``); ``--gc-every 0`` leaves CPython's automatic collector on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    # The paper's MixLoRA config and its LoRA baseline (Table 3).
    "mixlora": dict(peft_type="MIXLORA", r=16, lora_alpha=32, lora_dropout=0.05, num_experts=8, top_k=2,
                    router_aux_loss_coef=0.001, target_modules=TARGETS),
    "lora80": dict(peft_type="LORA", r=80, lora_alpha=160, lora_dropout=0.05, target_modules=TARGETS),
}
# Levers, as (base case, deep-merged DeepSpeed overrides, run-config ``deepspeed`` section changes).
# The shipped configs already carry the lean settings (no overlap_comm, no contiguous gradient
# buckets, no bf16 overflow check; for DeepSpeed's stage-3 engine also the adapter's tensors
# persistent and plain F.linear); "*_ds_defaults" put DeepSpeed's usual values back.
USUAL_BUCKETS = {"overlap_comm": True, "contiguous_gradients": True}
DEEPSPEED_ZERO3 = {"zero3_impl": "deepspeed"}
VARIANTS = {
    "zero3_deepspeed": ("zero3", {}, DEEPSPEED_ZERO3),
    "zero3_no_prefetch": ("zero3", {}, {"zero3_prefetch_layers": 0}),
    "zero3_prefetch2": ("zero3", {}, {"zero3_prefetch_layers": 2}),
    "zero3_nccl": ("zero3", {}, {"zero3_gather_transport": "nccl"}),
    "zero2_ds_defaults": ("zero2", {"bf16": {"check_grad_overflow": True}, "zero_optimization": USUAL_BUCKETS}, {}),
    "zero1": ("zero2", {"zero_optimization": {"stage": 1}}, {}),
    "zero2_overlap": ("zero2", {"zero_optimization": USUAL_BUCKETS}, {}),
    "zero3_deepspeed_ds_defaults": ("zero3", {"zero_optimization": dict(
        USUAL_BUCKETS, stage3_param_persistence_threshold="auto", memory_efficient_linear=True)}, DEEPSPEED_ZERO3),
    "zero3_deepspeed_prefetch": ("zero3", {"zero_optimization": {"stage3_prefetch_bucket_size": 3 * 10**8}},
                                 DEEPSPEED_ZERO3),
}
CASES = ("plain", "ddp", "zero2", "zero3", *VARIANTS)


def case_ds_config(case: str) -> dict:
    """The DeepSpeed dict of a case: a shipped config (its "auto" values resolved later), or a variant."""
    if case in VARIANTS:
        from mixlora_ds.train.ds_config import deep_merge

        base, over, _ = VARIANTS[case]
        return deep_merge(case_ds_config(base), over)
    if case not in ("zero2", "zero3"):
        raise ValueError(case)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "ds_configs", f"{case}_bf16.json"), encoding="utf-8") as f:
        return json.load(f)


def make_config(args, world: int):
    from mixlora_ds import MixLoraConfig
    from mixlora_ds.train.config import TrainConfig, load_config

    cfg: TrainConfig = load_config(None)
    cfg.model.config = dict(MODELS[args.model])
    cfg.model.attn_implementation = args.attn
    cfg.model.gradient_checkpointing = args.checkpointing
    cfg.model.compile = args.compile or args.cuda_graphs
    cfg.model.cuda_graphs = args.cuda_graphs
    cfg.adapter = MixLoraConfig(**ADAPTERS[args.adapter])
    cfg.batch.micro_batch_size = args.micro
    cfg.batch.global_batch_size = args.micro * world
    cfg.optim.impl = "torch"
    cfg.precision = args.precision
    cfg.seed = 0
    for key, value in (VARIANTS[args.case][2] if args.case in VARIANTS else {}).items():
        setattr(cfg.deepspeed, key, value)
    return cfg


def peak_mem_gb(current: bool = False) -> float:
    """Peak (or, with ``current``, present) memory the caching allocator hands out, GB; on CPU the
    process's peak resident memory."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return (acc.memory_allocated() if current else acc.max_memory_allocated()) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def symmetric_memory_uncounted_gb(sharded, device) -> float:
    """The shards' symmetric memory when the caching allocator does not count it (PyTorch versions
    differ: some allocate symmetric memory from a pool of the allocator, some beside it), else 0."""
    import torch

    from mixlora_ds.parallel import peer_copy

    before = torch.cuda.memory_allocated(device)
    probe = peer_copy.allocate(2**18, torch.uint8, device)
    counted = torch.cuda.memory_allocated(device) > before
    del probe
    if counted:
        return 0.0
    return sum(s.shard_S.numel() * s.shard_S.element_size() for s in sharded.all_shards()) / 2**30


def synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def run_case(args) -> dict:
    import torch

    from mixlora_ds import dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.case == "plain" and world != 1:
        raise SystemExit("the plain case runs in one process")
    dist.init_distributed(10)
    device = dist.device()
    cfg = make_config(args, world)
    from mixlora_ds.train.ds_config import (engine_ds_config, resolve_ds_config, resolve_precision,
                                            shards_base_itself, zero_stage)

    precision = resolve_precision(cfg, device.type)
    from mixlora_ds.train.base_model import hf_config_for
    from mixlora_ds.train.build import build_model, count_parameters, start_engine
    from mixlora_ds.train.compiled_layers import begin_step
    from mixlora_ds.train.plan import ModelPlan

    torch.manual_seed(0)
    torch_only = args.case in ("plain", "ddp")
    if torch_only:
        ds_config, stage = None, 0
        plan = ModelPlan(cfg, hf_config_for(cfg), precision, stage, {}, shards_base=False)
        with torch.device(device):  # random init straight on the device: 7B on CPU takes minutes
            built = build_model(plan)
        model = built.model
        if args.case == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.AdamW([p for _, p in built.trainable], lr=1e-4, weight_decay=0.01)
    else:
        here_cfg = case_ds_config(args.case)
        tmp = os.path.join(args.workdir, f"ds_{args.case}_{os.getpid()}.json")
        os.makedirs(args.workdir, exist_ok=True)
        json.dump(here_cfg, open(tmp, "w"))
        cfg.deepspeed.config = tmp
        ds_config = resolve_ds_config(cfg, world, MODELS[args.model]["hidden_size"], device.type)
        stage = zero_stage(ds_config)
        if args.compile and stage == 3 and cfg.deepspeed.zero3_impl == "deepspeed":
            raise SystemExit("--compile (model.compile) does not work with DeepSpeed's stage-3 engine")
        plan = ModelPlan(cfg, hf_config_for(cfg), precision, stage, ds_config, shards_base_itself(cfg, ds_config))
        if stage == 3:  # zero.Init places each shard on the device itself
            built = build_model(plan)
        else:
            with torch.device(device):
                built = build_model(plan)
        model = start_engine(built, engine_ds_config(cfg, ds_config))
    total, trainable = count_parameters(built.model)
    allocated_after_build = peak_mem_gb(current=True)
    vocab = MODELS[args.model]["vocab_size"]
    g = torch.Generator().manual_seed(dist.rank())
    ids = torch.randint(3, vocab, (args.micro, args.seq), generator=g).to(device)

    def forward():
        if args.cuda_graphs:
            begin_step()
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))

    def backward(loss):
        loss.backward() if torch_only else model.backward(loss)

    def optimizer_step():
        if torch_only:
            torch.nn.utils.clip_grad_norm_([p for _, p in built.trainable], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.step()

    def step():
        loss = forward()
        backward(loss)
        optimizer_step()
        return loss

    from mixlora_ds.train.gc_schedule import ScheduledGC

    collector = ScheduledGC(args.gc_every)
    for i in range(args.warmup):
        step()
        collector.step(i + 1)
    synchronize()
    dist.barrier()
    if args.profile or args.trace:
        trace = None
        if args.trace and dist.rank() < 2:
            os.makedirs(args.trace, exist_ok=True)
            trace = os.path.join(args.trace, f"trace_{args.case}_{args.adapter}_w{world}_r{dist.rank()}.json")
        profile_step((forward, backward, optimizer_step), device, trace)
    t0 = time.perf_counter()
    issued = []  # host time per step: shows steps that wait on the device
    for i in range(args.steps):
        t_step = time.perf_counter()
        loss = step()
        collector.step(args.warmup + i + 1)
        issued.append(round((time.perf_counter() - t_step) * 1e3, 1))
    synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    t_gc = time.perf_counter()
    gc.collect(1)  # what a scheduled collection costs, once every --gc-every steps
    gc_ms = (time.perf_counter() - t_gc) * 1e3
    tokens = args.micro * args.seq
    result = {
        "case": args.case, "adapter": args.adapter, "model": args.model, "world": world, "micro": args.micro,
        "seq": args.seq, "precision": precision, "checkpointing": args.checkpointing, "attn": args.attn,
        "step_ms": round(dt * 1e3, 2), "tokens_per_s_per_gpu": round(tokens / dt, 1),
        "peak_mem_gb": round(peak_mem_gb(), 2), "params": total, "trainable": trainable,
        "loss": round(float(loss), 4), "device": device.type, "host_ms_per_step": issued,
        "trainable_tensors": sum(1 for p in built.model.parameters() if p.requires_grad),
        "gc_every": args.gc_every, "compile": args.compile,
        "zero3_impl": cfg.deepspeed.zero3_impl if stage == 3 else None,
        "gc_young_ms": round(gc_ms, 1),
        "transport": built.sharded_base.transport if built.sharded_base is not None else None,
        "allocated_after_build_gb": round(allocated_after_build, 2),
    }
    if device.type == "cuda":  # everything on the GPU, symmetric memory and NCCL's buffers included
        free, whole = torch.cuda.mem_get_info(device)
        result["device_used_gb"] = round((whole - free) / 2**30, 2)
    if result["transport"] == "copy_engine":
        result["peak_mem_gb"] += symmetric_memory_uncounted_gb(built.sharded_base, device)
    # Report the slowest rank: a step is as fast as its slowest participant.
    t = torch.tensor([dt, result["peak_mem_gb"]], dtype=torch.float64, device=device)
    dist.all_reduce_(t, "max")
    result["step_ms"] = round(float(t[0]) * 1e3, 2)
    result["tokens_per_s_per_gpu"] = round(tokens / float(t[0]), 1)
    result["peak_mem_gb"] = round(float(t[1]), 2)
    if args.check and built.sharded_base is not None:
        result.update(check_sharded(built, ids))
    if dist.is_main():
        print("RESULT " + json.dumps(result), flush=True)
    return result


def check_sharded(built, ids) -> dict:
    """The per-layer gathers (asynchronous, one layer ahead) against the whole base gathered up front
    with the hooks off: logits, and the gradient of the loss with respect to the input embeddings,
    which needs every layer's frozen weights in backward. Dropout off; the same kernels run on the
    same values, so any difference is a gather that read memory before it was written."""
    import torch

    from mixlora_ds import dist
    from mixlora_ds.model.partitioned import gathered
    from mixlora_ds.parallel.frozen_base import frozen_params

    model, vocab = built.model, built.model.config.vocab_size
    model.eval()

    def logits_and_grad():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
        (grad,) = torch.autograd.grad(loss, emb)
        return logits.detach().float(), grad.float()

    sharded_logits, sharded_grad = logits_and_grad()
    built.sharded_base.remove_hooks()
    with gathered(frozen_params(model)):
        whole_logits, whole_grad = logits_and_grad()
    t = torch.tensor([(sharded_logits - whole_logits).abs().max(), (sharded_grad - whole_grad).abs().max(),
                      whole_grad.abs().max()], dtype=torch.float64, device=ids.device)
    dist.all_reduce_(t, "max")
    return {"check_logits_maxdiff": float(t[0]), "check_grad_maxdiff": float(t[1]), "check_grad_max": float(t[2])}


def profile_step(phases_fns, device, trace: str | None = None) -> None:
    """Where a step's time goes: phase times with a sync after each phase, then a torch.profiler table
    of host-side ops (what keeps the GPU waiting) and the synchronisations issued per step; with
    ``trace``, the profiled steps' timeline as a gzipped Chrome trace there (read it with
    ``benchmarks/trace_summary.py``)."""
    import torch

    from mixlora_ds import dist

    forward, backward, optimizer_step = phases_fns
    times = {"forward": [], "backward": [], "step": []}
    for _ in range(3):
        synchronize()
        t0 = time.perf_counter()
        loss = forward()
        synchronize()
        t1 = time.perf_counter()
        backward(loss)
        synchronize()
        t2 = time.perf_counter()
        optimizer_step()
        synchronize()
        t3 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(v * 1e3)
    if dist.is_main():
        print("PHASES_MS " + json.dumps({k: round(sorted(v)[1], 1) for k, v in times.items()}), flush=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            backward(forward())
            optimizer_step()
        synchronize()
    if trace:
        import gzip
        import shutil

        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
    if dist.is_main():
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70), flush=True)
        if device.type == "cuda":
            print(ka.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70), flush=True)
        syncs = {e.key: e.count // 2 for e in ka
                 if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense")}
        print("SYNCS_PER_STEP " + json.dumps(syncs), flush=True)


def sweep(args) -> None:
    rows = []
    port = args.base_port
    for adapter in args.adapters.split(","):
        for case in args.cases.split(","):
            for world in [int(w) for w in args.gpus.split(",")]:
                if case == "plain" and world != 1:
                    continue
                port += 1
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                       "--master_port", str(port), os.path.abspath(__file__), "run", "--case", case,
                       "--adapter", adapter, "--model", args.model, "--micro", str(args.micro), "--seq",
                       str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision",
                       args.precision, "--attn", args.attn, "--workdir", args.workdir, "--gc-every", str(args.gc_every)]
                for flag in ("compile", "cuda_graphs", "check", "checkpointing", "profile"):
                    if getattr(args, flag):
                        cmd.append(f"--{flag.replace('_', '-')}")
                if args.trace:
                    cmd += ["--trace", args.trace]
                env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
                t = time.time()
                try:
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    out = p.stdout + p.stderr
                except subprocess.TimeoutExpired as e:
                    out, p = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
                line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    row = {"case": case, "adapter": adapter, "world": world, "error": out[-2000:] or "timeout"}
                else:
                    row = json.loads(line[len("RESULT "):])
                row["wall_s"] = round(time.time() - t, 1)
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = {(r["adapter"]): r["tokens_per_s_per_gpu"] for r in rows if r.get("case") == "plain" and "error" not in r}
    z2 = {(r["adapter"], r["world"]): r["tokens_per_s_per_gpu"] for r in rows
          if r.get("case") == "zero2" and "error" not in r}
    print(f"\n{'adapter':8} {'case':14} {'gpus':>4} {'tok/s/gpu':>10} {'x plain':>8} {'x zero2':>8} {'peak GB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['adapter']:8} {r['case']:14} {r['world']:>4} ERROR: {r['error'].splitlines()[-1][:60]}")
            continue
        tps = r["tokens_per_s_per_gpu"]
        xp = tps / base[r["adapter"]] if r["adapter"] in base else float("nan")
        xz = tps / z2[(r["adapter"], r["world"])] if (r["adapter"], r["world"]) in z2 else float("nan")
        print(f"{r['adapter']:8} {r['case']:14} {r['world']:>4} {tps:>10.1f} {xp:>8.3f} {xz:>8.3f} {r['peak_mem_gb']:>8.2f}")


def main() -> None:
    from mixlora_ds.train.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="7b", choices=sorted(MODELS))
        s.add_argument("--micro", type=int, default=4)
        s.add_argument("--seq", type=int, default=512)
        s.add_argument("--steps", type=int, default=10)
        s.add_argument("--warmup", type=int, default=3)
        s.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
        s.add_argument("--attn", default="sdpa")
        s.add_argument("--checkpointing", action="store_true", help="activation checkpointing (off by default)")
        s.add_argument("--workdir", default="/tmp/bench_zero")
        s.add_argument("--profile", action="store_true", help="print phase times and a profiler table")
        s.add_argument("--trace", default=None, metavar="DIR",
                       help="profile as --profile does, and write ranks 0 and 1's timelines there (Chrome trace)")
        s.add_argument("--check", action="store_true",
                       help="after timing, compare the sharded base's per-layer gathers with the whole base "
                            "gathered up front (zero3 cases)")
        s.add_argument("--compile", action="store_true",
                       help="torch.compile each decoder layer's forward, the training config's model.compile "
                            "(not with DeepSpeed's stage-3 engine)")
        s.add_argument("--cuda-graphs", action="store_true",
                       help="--compile, replayed as CUDA graphs: the training config's model.cuda_graphs (ZeRO-2)")
        s.add_argument("--gc-every", type=int, default=TrainConfig.gc_every_steps,
                       help="Python GC every N steps on all ranks (0: CPython's automatic collector)")
        s.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        if name == "run":
            s.add_argument("--case", required=True, choices=CASES)
            s.add_argument("--adapter", default="mixlora", choices=sorted(ADAPTERS))
        else:
            s.add_argument("--cases", default="plain,zero2,zero3")
            s.add_argument("--adapters", default="lora80,mixlora")
            s.add_argument("--gpus", default="1,2")
            s.add_argument("--out", default=None)
            s.add_argument("--timeout", type=int, default=900)
            s.add_argument("--base_port", type=int, default=29610)
    args = p.parse_args()
    if args.cmd == "run":
        run_case(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
