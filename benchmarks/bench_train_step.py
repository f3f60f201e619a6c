"""One training step (forward + backward + AdamW) of a LLaMA-2-7B-shaped model, adapters side by side.

    python benchmarks/bench_train_step.py                 # GPU: 7B shape, batch 4 x 512, bf16
    python benchmarks/bench_train_step.py --tiny          # CPU smoke run

Variants, each on a fresh random bf16 model in the same process:
  base            frozen base, no adapter (backward to the inputs): the ceiling no PEFT method can pass
  peft-lora       PEFT LoRA r=80 alpha=160 on all 7 projections (the paper's LoRA baseline budget), bf16
                  adapter weights (``autocast_adapter_dtype=False``: what a bf16 DeepSpeed run trains)
  peft-lora-fp32  the same with PEFT's default fp32 adapter weights
  reference       the reference ``mixlora`` 0.2.3 layers: 8 experts, top-2, r=16 alpha=32, attention LoRA too
  mixlora_ds      the same MixLoRA config here, default (masked-dense) path, fp32 adapter weights;
                  ``mixlora_ds-bf16``: bf16 adapter weights; ``-dense`` / ``-fused`` / ``-grouped`` force a
                  compute path; ``-pairc`` compiles the dense path's per-pair math
  ...-compiled    any variant with every decoder layer's forward through ``torch.compile`` (what
                  ``model.compile: true`` does); e.g. ``base-compiled``, ``mixlora_ds-bf16-fused-compiled``
  ...-compiled-graphs  the same, replayed as CUDA graphs (``model.cuda_graphs: true``)
Reports tokens/s (median of timed steps) and peak memory; ``--profile N`` then profiles N more steps
and prints the GPU kernels by time per step and the host's operators by self time (whether the GPU
or the host sets the pace). Per-block view: ``bench_moe_block.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mixlora_ds.train.compiled_layers import begin_step, compile_layers, copy_gradients_out

EXPERTS = [8, 2]  # MixLoRA experts, top-k (set from the command line)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


def fresh_model(cfg: LlamaConfig, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attach(variant: str, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Add the variant's adapter (``-compiled`` then compiles every decoder layer); return the
    parameters the optimizer trains."""
    for suffix, graphs in (("-compiled-graphs", True), ("-compiled", False)):
        if variant.endswith(suffix):
            params = attach(variant[: -len(suffix)], model)
            compile_layers(model.model.layers, cuda_graphs=graphs)
            if graphs:
                copy_gradients_out(params)  # what the trainer does (it accumulates gradients)
            return params
    if variant == "base":
        model.enable_input_require_grads()
        return []
    if variant in ("peft-lora", "peft-lora-fp32"):
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(model, LoraConfig(r=80, lora_alpha=160, lora_dropout=0.05, target_modules=TARGETS),
                              autocast_adapter_dtype=variant.endswith("fp32"))
        model.peft_wrapper = peft  # keep the wrapper alive; the modules are injected in place
        return [p for p in model.parameters() if p.requires_grad]
    if variant == "reference":
        return attach_reference(model)
    from mixlora_ds import MixLoraConfig, inject_mixlora

    from mixlora_ds.model.moe import moe_blocks, set_compute_path

    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
    inject_mixlora(model, MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=EXPERTS[0],
                                        top_k=EXPERTS[1], target_modules=TARGETS), adapter_dtype=dtype)
    path = next((p for p in ("grouped", "dense", "fused") if f"-{p}" in variant), "dense")
    set_compute_path(model, path)
    for block in moe_blocks(model):
        block.compiled = "-pairc" in variant
    return [p for p in model.parameters() if p.requires_grad]


def attach_reference(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    import mixlora
    from mixlora.config import MixLoraConfig as RefConfig

    cfg = model.config
    ref_cfg = RefConfig.from_config({
        "bias": "none", "peft_type": "MIXLORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "target_modules": TARGETS, "routing_strategy": "mixlora", "num_experts": 8, "top_k": 2, "act_fn": "silu",
        "base_model_name_or_path": "random", "task_type": "CAUSAL_LM",
    })
    ref_cfg.adapter_name_ = "default"
    ref_cfg.dtype_ = torch.float32
    dev = next(model.parameters()).device
    d, i, r, e = cfg.hidden_size, cfg.intermediate_size, 16, 8
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    weights = {}
    for layer in range(cfg.num_hidden_layers):
        weights[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = torch.randn(e, d, device=dev) * 0.02
        for proj in TARGETS[:4]:
            fi, fo = shapes[proj]
            weights[f"mixlora.layers.{layer}.self_attn.{proj}.lora_A.weight"] = torch.randn(r, fi, device=dev) * 0.01
            weights[f"mixlora.layers.{layer}.self_attn.{proj}.lora_B.weight"] = torch.zeros(fo, r, device=dev)
        for proj in TARGETS[4:]:
            fi, fo = shapes[proj]
            for j in range(e):
                weights[f"mixlora.layers.{layer}.mlp.{proj}.experts.{j}.lora_A.weight"] = torch.randn(r, fi, device=dev) * 0.01
                weights[f"mixlora.layers.{layer}.mlp.{proj}.experts.{j}.lora_B.weight"] = torch.zeros(fo, r, device=dev)
    mixlora.inject_adapter_in_model(model, ref_cfg, weights)
    params = []
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            moe.gate_ = moe.gate_.detach().requires_grad_(True)
            params.append(moe.gate_)
            for expert in moe.experts_.values():
                params += [expert.lora_A.weight, expert.lora_B.weight]
        for proj in TARGETS[:4]:
            lin = getattr(layer.self_attn, proj)
            params += [lin.lora_A.weight, lin.lora_B.weight]
    for p in params:
        p.requires_grad_(True)
    model.enable_input_require_grads()
    return params


def time_steps(model, params, batch, seq, vocab, steps, warmup, device, profile_steps=0, graphs=False):
    """Median step seconds; with ``profile_steps``, that many more steps under torch.profiler
    (``print_kernel_profile``)."""
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    times = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        if graphs:
            begin_step()
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if hasattr(model, "mixlora_config"):
            from mixlora_ds.model.aux_loss import mixlora_aux_loss

            loss = loss + mixlora_aux_loss(model)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if profile_steps:
        print_kernel_profile(step, profile_steps, sync)
    return statistics.median(times)


def print_kernel_profile(step, n: int, sync, top: int = 30) -> None:
    """Profile ``n`` steps: how busy the GPU was, its kernels by time per step, and the host's
    operators by self time per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / n
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time / 1e3 / n
            k[1] += 1 / n
    busy = sum(v[0] for v in kernels.values())
    print(f"  profile: {wall_ms:.1f} ms/step under the profiler, GPU kernels {busy:.1f} ms/step")
    for name, (ms, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:8.2f} ms {count:7.0f}x  {name[:110]}")
    print("  host: operators by self CPU time per step")
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top // 2]:
        print(f"  {e.self_cpu_time_total / 1e3 / n:8.2f} ms {e.count / n:7.0f}x  {e.key[:110]}")


def run_variant(variant, cfg, args, device):
    model = fresh_model(cfg, device)
    params = attach(variant, model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    skips_before = cudagraph_skips()
    sec = time_steps(model, params, args.batch, args.seq, cfg.vocab_size, args.steps, args.warmup, device,
                     args.profile, graphs=variant.endswith("-graphs"))
    skipped = cudagraph_skips() - skips_before
    if skipped:
        print(f"  {variant}: Inductor ran {skipped} compiled graph(s) without CUDA graphs (TORCH_LOGS=perf_hints says why)")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    n_train = sum(p.numel() for p in params)
    del model, params
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant, "tokens_per_s": args.batch * args.seq / sec, "step_s": sec, "peak_gib": peak,
            "trainable_params": n_train, "cudagraph_skips": skipped}


def cudagraph_skips() -> int:
    """Compiled graphs Inductor has run without CUDA graphs so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke run)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="base,base-compiled,peft-lora,peft-lora-compiled,peft-lora-fp32,"
                    "mixlora_ds-bf16-dense,mixlora_ds-bf16-dense-compiled,mixlora_ds-bf16-fused,"
                    "mixlora_ds-bf16-fused-compiled")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile this many steps and print the GPU kernels by time")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.seq, args.steps, args.warmup = min(args.seq, 64), min(args.steps, 2), 1
    cfg = model_config(args.tiny)
    EXPERTS[:] = [args.experts, args.top_k]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch} x seq {args.seq}")
    print(f"MixLoRA: {args.experts} experts, top-{args.top_k}, r=16")
    print(f"{'variant':<34}{'tokens/s':>12}{'step ms':>10}{'peak GiB':>10}{'trainable':>14}")
    results = []
    for variant in args.variants.split(","):  # each row as it comes: a cut-off run keeps what it measured
        r = run_variant(variant, cfg, args, device)
        results.append(r)
        print(f"{r['variant']:<34}{r['tokens_per_s']:>12,.0f}{r['step_s'] * 1e3:>10.1f}{r['peak_gib']:>10.1f}"
              f"{r['trainable_params']:>14,}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
