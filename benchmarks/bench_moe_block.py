"""One MixLoRA feed-forward block alone, forward and forward+backward: the per-kernel view.

    python benchmarks/bench_moe_block.py            # GPU: D 4096, I 11008, 2048 tokens, E 8, top-2, r 16, bf16
    python benchmarks/bench_moe_block.py --tiny     # CPU smoke run

Variants: the frozen dense FFN (backward to its input only), the dense FFN with PEFT-style LoRA r=80
on its 3 projections, mixlora_ds masked-dense and grouped (fp32 and bf16 adapters), the per-expert loop, and the
reference ``mixlora`` 0.2.3 block.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

FFN = ("gate_proj", "up_proj", "down_proj")


def build(variant: str, cfg: LlamaConfig, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        mlp = LlamaMLP(cfg).to(torch.bfloat16)
    for p in mlp.parameters():
        p.requires_grad_(False)
    if variant == "dense":
        return mlp
    if variant == "dense+lora80":
        from mixlora_ds.config import LoraSettings
        from mixlora_ds.model.lora import LoraLinear

        s = LoraSettings(80, 160, 0.05, False, False, "original")
        for name in FFN:
            setattr(mlp, name, LoraLinear(getattr(mlp, name), s))
        return mlp
    if variant == "reference":
        return reference_block(mlp, cfg, device)
    from mixlora_ds import MixLoraConfig
    from mixlora_ds.model.families import family_for
    from mixlora_ds.model.moe import MixLoraMoeBlock

    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
    mc = MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=8, top_k=2, target_modules=list(FFN))
    block = MixLoraMoeBlock(mlp, family_for("llama"), mc, cfg.hidden_size, "silu", dtype)
    with torch.no_grad():
        for stack in block.experts.values():
            stack.lora_B.normal_(0, 0.01)
    block.compute_path = {"loop": "loop", "grouped": "grouped", "masked": "dense"}[variant.split("-")[0]]
    block.compiled = variant.endswith("compiled")
    return block


def reference_block(mlp, cfg, device):
    from mixlora.config import MixLoraConfig as RefConfig
    from mixlora.lora_linear import LoraLinear as RefLora
    from mixlora.model import MixLoraSparseMoe

    rc = RefConfig.from_config({"bias": "none", "peft_type": "MIXLORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                "target_modules": list(FFN), "routing_strategy": "mixlora", "num_experts": 8,
                                "top_k": 2, "act_fn": "silu", "base_model_name_or_path": "x", "task_type": "CAUSAL_LM"})
    rc.dtype_, rc.model_type_, rc.adapter_name_ = torch.float32, "llama", "default"
    moe = MixLoraSparseMoe(mlp, rc)
    moe.gate_ = (torch.randn(8, cfg.hidden_size, device=device) * 0.02).requires_grad_()
    for e in range(8):
        for name in FFN:
            moe.experts_[f"experts.{e}.{name}"] = RefLora(getattr(mlp, name), rc)
    return moe


def timeit(fn, steps, warmup, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--variants", default="dense,dense+lora80,masked,masked-bf16,masked-bf16-compiled,grouped,grouped-bf16,loop,reference")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cfg = LlamaConfig(hidden_size=64 if args.tiny else 4096, intermediate_size=176 if args.tiny else 11008)
    tokens = 128 if args.tiny else args.tokens
    steps, warmup = (3, 1) if args.tiny else (20, 5)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; tokens {tokens}; "
          f"D {cfg.hidden_size} I {cfg.intermediate_size}; E 8 top-2 r 16")
    print(f"{'variant':<16}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak GiB':>10}")
    for variant in args.variants.split(","):
        block = build(variant, cfg, device)
        x = torch.randn(4, tokens // 4, cfg.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        with torch.no_grad():
            fwd = timeit(lambda: block(x), steps, warmup, device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() if device == "cuda" else 0
        both = timeit(lambda: block(x).backward(g), steps, warmup, device)
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30 if device == "cuda" else float("nan")
        print(f"{variant:<16}{fwd:>10.2f}{both:>12.2f}{peak:>10.2f}")
        block = None  # free it before the next variant
        if device == "cuda":
            torch.cuda.empty_cache()
    from mixlora_ds.model import grouped_mm

    print("grouped_mm fell back to the loop for:", sorted(grouped_mm._UNSUPPORTED) or "nothing")


if __name__ == "__main__":
    main()
