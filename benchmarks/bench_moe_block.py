"""One MixLoRA feed-forward block alone, forward and forward+backward: the per-kernel view.

    python benchmarks/bench_moe_block.py            # GPU: D 4096, I 11008, 2048 tokens, E 8, top-2, r 16, bf16
    python benchmarks/bench_moe_block.py --tiny     # CPU smoke run

Variants: the frozen dense FFN (backward to its input only), the dense FFN with PEFT-style LoRA r=80
on its 3 projections, mixlora_ds masked-dense and grouped (fp32 and bf16 adapters), the fused Triton kernels
(``fused-bf16``), the per-expert loop, and the reference ``mixlora`` 0.2.3 block.

``--roofline`` (GPU) then times the fused kernels alone and each frozen GEMM, and prints for each the
bytes it must move and the FLOPs it must do, the time those take at the given bandwidth and matrix
rate (default: H200, 4.3 TB/s and 790 bf16 TFLOP/s), and the time measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

FFN = ("gate_proj", "up_proj", "down_proj")
EXPERTS = [8]


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
    mc = MixLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=EXPERTS[0], top_k=2,
                       target_modules=list(FFN))
    block = MixLoraMoeBlock(mlp, family_for("llama"), mc, cfg.hidden_size, "silu", dtype)
    with torch.no_grad():
        for stack in block.experts.values():
            stack.lora_B.normal_(0, 0.01)
    paths = {"loop": "loop", "grouped": "grouped", "masked": "dense", "fused": "fused"}
    block.compute_path = paths[variant.split("-")[0]]
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
    ap.add_argument("--variants", default="dense,dense+lora80,masked-bf16,masked-bf16-compiled,fused-bf16,grouped-bf16,"
                    "loop,reference")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--roofline", action="store_true", help="time the fused kernels and frozen GEMMs alone")
    ap.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the roofline")
    ap.add_argument("--flops", type=float, default=790e12, help="bf16 matrix FLOP/s for the roofline")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cfg = LlamaConfig(hidden_size=64 if args.tiny else 4096, intermediate_size=176 if args.tiny else 11008)
    tokens = 128 if args.tiny else args.tokens
    steps, warmup = (3, 1) if args.tiny else (20, 5)
    EXPERTS[0] = args.experts
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; tokens {tokens}; "
          f"D {cfg.hidden_size} I {cfg.intermediate_size}; E {args.experts} top-2 r 16")
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
    if args.roofline and device == "cuda":
        roofline(tokens, cfg.hidden_size, cfg.intermediate_size, args.experts, 2, 16, args.bandwidth, args.flops)


def roofline(T: int, D: int, I: int, E: int, K: int, r: int, bandwidth: float, flops: float) -> None:
    """Each kernel of a fused MixLoRA block alone: bytes and FLOPs it must do, the floor they give, measured."""
    import triton

    from mixlora_ds.model.kernels.pair_op import fused_pair_math

    bf = dict(device="cuda", dtype=torch.bfloat16)
    ER = E * r
    x = torch.randn(T, D, **bf)
    W = torch.randn(I, D, **bf) / D**0.5
    G, U = (torch.randn(T, I, **bf).requires_grad_() for _ in range(2))
    lora = lambda i, o: (torch.randn(ER, i, **bf) / i**0.5, (torch.randn(ER, o, **bf) * 0.01), 0.05)  # noqa: E731
    l1, l3, l2 = lora(D, I), lora(D, I), lora(I, D)
    for t in (*l1[:2], *l3[:2], *l2[:2]):
        t.requires_grad_()
    expert = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    weight = torch.rand(T, K, device="cuda").requires_grad_()
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    code1, code3 = x @ l1[0].t(), x @ l3[0].t()
    args = (G, U, code1, code3, l1[1], l3[1], l2[0], expert, weight, seed, r, 0.05, "silu")
    mixed, mcode = torch.ops.mixlora_ds.pair_ffn(*args)
    gm, gc = torch.randn_like(mixed), torch.randn_like(mcode)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3  # noqa: E731
    two = 2  # bytes per bf16 element
    rows = [
        ("frozen GEMM x W1^T (fwd; 3 per FFN)", lambda: x @ W.t(), 2 * T * D * I, two * (T * D + D * I + T * I)),
        ("pair kernel fwd", lambda: torch.ops.mixlora_ds.pair_ffn(*args),
         2 * T * K * I * ER * 3, two * 3 * T * I + 4 * T * ER),
        ("pair kernel bwd", lambda: torch.ops.mixlora_ds.pair_ffn_backward(gm, gc, *args),
         2 * T * K * I * ER * 8, two * 5 * T * I + 4 * (3 * ER * I + 2 * T * ER)),
        ("whole fused per-pair fwd+bwd (autograd)", lambda: torch.autograd.grad(
            sum(o.float().square().sum()
                for o in fused_pair_math(x, expert, weight, [G, U], [l1, l3], l2, True, "silu", num_experts=E)),
            [G, U, weight]),
         2 * T * K * I * ER * 11, two * 8 * T * I),
    ]
    print(f"\nroofline: {T} tokens, D {D}, I {I}, E {E}, top-{K}, r {r}; "
          f"{bandwidth / 1e12:.1f} TB/s, {flops / 1e12:.0f} TFLOP/s")
    print(f"{'kernel':<42}{'GFLOP':>8}{'MB':>8}{'floor us':>10}{'measured us':>13}{'of floor':>10}")
    for name, fn, nflop, nbytes in rows:
        floor = max(nflop / flops, nbytes / bandwidth)
        t = bench(fn)
        print(f"{name:<42}{nflop / 1e9:>8.1f}{nbytes / 1e6:>8.1f}{floor * 1e6:>10.1f}{t * 1e6:>13.1f}{floor / t:>10.0%}")


if __name__ == "__main__":
    main()
