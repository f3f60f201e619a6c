"""One MixLoRA feed-forward block alone, forward and forward+backward: the per-kernel view.

    python benchmarks/bench_moe_block.py            # GPU: D 4096, I 11008, 2048 tokens, E 8, top-2, r 16, bf16
    python benchmarks/bench_moe_block.py --tiny     # CPU smoke run

Variants: the frozen dense FFN (backward to its input only), the dense FFN with PEFT-style LoRA r=80
on its 3 projections, mixlora_ds masked-dense and grouped (fp32 and bf16 adapters), the fused per-pair op
(``fused-bf16``), the per-expert loop, and the reference ``mixlora`` 0.2.3 block.

``--roofline`` (GPU) then times each piece of the fused per-pair op (its GEMMs and element-wise passes)
and a frozen GEMM alone, and prints for each the bytes it must move and the FLOPs it must do, the time those take at the given bandwidth and matrix
rate (default by GPU: ``PEAKS``), and the time measured.
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

    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
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
    ap.add_argument("--roofline", action="store_true", help="time the pieces of the fused op and a frozen GEMM alone")
    ap.add_argument("--bandwidth", type=float, default=None, help="bytes/s for the roofline (default: by GPU)")
    ap.add_argument("--flops", type=float, default=None, help="bf16 matrix FLOP/s for the roofline (default: by GPU)")
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
        bandwidth, flops = PEAKS["H100" if "H100" in torch.cuda.get_device_name() else "H200"]
        roofline(tokens, cfg.hidden_size, cfg.intermediate_size, args.experts, 2, 16, args.bandwidth or bandwidth,
                 args.flops or flops)


PEAKS = {"H100": (3.35e12, 989e12), "H200": (4.3e12, 790e12)}
"""Memory bandwidth (bytes/s) and dense bf16 matrix rate (FLOP/s) the roofline assumes: the H100 SXM
data sheet; for the H200 the figures its issue states."""

TILES = [(4, 512, 4), (16, 128, 4), (8, 512, 8), (2, 1024, 4), (16, 256, 8), (8, 128, 4)]
"""Other (tokens, columns, warps) tiles of the element-wise passes that ``--roofline`` times."""


def roofline(T: int, D: int, I: int, E: int, K: int, r: int, bandwidth: float, flops: float) -> None:
    """Each piece of the fused per-pair op alone (``kernels/pair_op.py``), and the op as a whole: bytes
    and FLOPs it must do, the floor they give at ``bandwidth`` / ``flops``, and the time measured."""
    import triton

    from mixlora_ds.model.kernels import pair_op, triton_pair

    bf = dict(device="cuda", dtype=torch.bfloat16)
    ER, P = E * r, T * K
    rnd = lambda *shape: torch.randn(*shape, **bf)  # noqa: E731
    x, W = rnd(T, D), rnd(I, D) / D**0.5
    G, U, DM = rnd(T, I), rnd(T, I), rnd(T, I)
    code1, code3, gcode = rnd(T, ER), rnd(T, ER), rnd(T, ER).float()
    B1, B3, A2 = rnd(ER, I) * 0.01, rnd(ER, I) * 0.01, rnd(ER, I) / I**0.5
    expert = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    weight = torch.rand(T, K, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    own = pair_op._own(expert, ER, r, torch.bfloat16)
    code_P = pair_op._pair_rows(code1, own)
    DG, DU, Q, HD = code_P @ B1, code_P @ B3, code_P @ A2, rnd(P, I)
    mixed, dgate, dup = torch.empty_like(G), torch.empty_like(G), torch.empty_like(G)
    dw_part_for = lambda tile: torch.empty(triton_pair.grid(T, I, tile)[1], T, K, device="cuda")  # noqa: E731
    dw_part = dw_part_for(triton_pair.TILE)
    args = (G, U, code1, code3, B1, B3, A2, expert, weight, seed, r, 0.05, "silu")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3  # noqa: E731
    two = 2  # bytes per bf16 element
    low_rank = (2 * P * ER * I, two * (P * ER + ER * I + P * I))  # one GEMM between [P, ER] and [P, I]
    rows = [
        ("frozen GEMM x W1^T (3 per FFN each way)", lambda: x @ W.t(), 2 * T * D * I, two * (T * D + D * I + T * I)),
        ("delta GEMM code_P @ B (2 fwd, 2+1 bwd)", lambda: code_P @ B1, *low_rank),
        ("code GEMM HD @ A2^T (1 fwd)", lambda: HD @ A2.t(), *low_rank),
        ("weight-grad GEMM code_P^T @ dg (3 bwd)", lambda: code_P.t() @ DG, *low_rank),
        ("code-grad GEMM dg @ B^T (2 bwd)", lambda: DG @ B1.t(), *low_rank),
        ("element-wise pass fwd", lambda: triton_pair.forward(G, U, DG, DU, weight, seed, mixed, HD, 0.05, "silu", K),
         0, two * (3 * T * I + 3 * P * I)),
        ("element-wise pass bwd", lambda: triton_pair.backward(G, U, DG, DU, DM, Q, weight, seed, dgate, dup,
                                                               dw_part, 0.05, "silu", K),
         0, two * (5 * T * I + 6 * P * I)),
        ("whole op fwd", lambda: torch.ops.mixlora_ds.pair_ffn(*args),
         3 * low_rank[0], 3 * low_rank[1] + two * (3 * T * I + 3 * P * I)),
        ("whole op bwd", lambda: torch.ops.mixlora_ds.pair_ffn_backward(DM, gcode, *args),
         8 * low_rank[0], 8 * low_rank[1] + two * (5 * T * I + 6 * P * I)),
    ]
    rows += [(f"element-wise pass {way}, tile {tile}", fn, 0, nbytes) for tile in TILES for way, fn, nbytes in (
        ("fwd", lambda tile=tile: triton_pair.forward(G, U, DG, DU, weight, seed, mixed, HD, 0.05, "silu", K, tile),
         two * (3 * T * I + 3 * P * I)),
        ("bwd", lambda tile=tile: triton_pair.backward(G, U, DG, DU, DM, Q, weight, seed, dgate, dup,
                                                       dw_part_for(tile), 0.05, "silu", K, tile),
         two * (5 * T * I + 6 * P * I)))]
    print(f"\nroofline: {T} tokens, D {D}, I {I}, E {E}, top-{K}, r {r}; "
          f"{bandwidth / 1e12:.1f} TB/s, {flops / 1e12:.0f} TFLOP/s")
    print(f"{'piece':<42}{'GFLOP':>8}{'MB':>8}{'floor us':>10}{'measured us':>13}{'of floor':>10}")
    for name, fn, nflop, nbytes in rows:
        floor = max(nflop / flops, nbytes / bandwidth)
        t = bench(fn)
        print(f"{name:<42}{nflop / 1e9:>8.1f}{nbytes / 1e6:>8.1f}{floor * 1e6:>10.1f}{t * 1e6:>13.1f}{floor / t:>10.0%}")


if __name__ == "__main__":
    main()
