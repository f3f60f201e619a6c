#!/usr/bin/env python
"""Inference speed: evaluation examples/s and generation tokens/s, base vs LoRA vs MixLoRA.

On a random LLaMA-2-7B-shaped bf16 model (no download, no tokenizer: token-id workloads) it measures
- evaluation (the scoring path of launch/evaluate.py: length-sorted batches, left padding, next-token
  logits at the last position, label argmax, expert-load profile for mixlora_ds) in examples/s;
- greedy generation with the KV cache at batch 1 and 16 in new tokens/s, and the time relative to
  the base model alone;
for these methods (the paper's adapter shapes, Table 3):
    base        the frozen model alone
    peft_lora   HF PEFT LoRA r=80 on all seven projections, unmerged (how the paper measured LoRA)
    lora        mixlora_ds plain LoRA r=80
    mixlora     mixlora_ds MixLoRA r=16, 8 experts, top-2
    reference   the reference mixlora 0.2.3 package, same MixLoRA shape

    python benchmarks/bench_eval_generate.py --out bench_eval_generate.jsonl          # GPU, 7B shape
    python benchmarks/bench_eval_generate.py --tiny                                    # CPU smoke test
    python benchmarks/bench_eval_generate.py --skip-eval --cache static --interleave \
        --methods base,mixlora,lora --repeats 9                                         # decode, A/B/A/B

Adapters are fp32 by default, as each package creates them by default (PEFT autocasts adapters of
a bf16 base to fp32, the reference uses fp32 unless told otherwise); --adapter-dtype bfloat16 makes
all of them bf16. Results are printed as a table and appended to --out as JSON lines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MODELS = {
    "7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
               rms_norm_eps=1e-5),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXLORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=8, top_k=2)
LORA = dict(r=80, lora_alpha=160, lora_dropout=0.05)
METHODS = ("base", "peft_lora", "lora", "mixlora", "reference")
LABELS = 9  # ARC's label set: the widest the reference scores


# ------------------------------------------------------------------------------------- models
def random_base(model: str, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights drawn directly on the device (a 7B fp32 draw on the CPU would take minutes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(MODELS[model])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _randomize_trainable(model, seed: int) -> None:
    """Non-zero LoRA B (and router) values: zeros would let a clever kernel skip work."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
            p.requires_grad_(False)


def build(method: str, model: str, device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype, seed: int,
          merge_lora: bool = True):
    base = random_base(model, device, dtype, seed)
    if method == "base":
        return base
    if method in ("lora", "mixlora"):
        from mixlora_ds import MixLoraConfig, inject_mixlora

        kw = dict(MIXLORA, peft_type="MIXLORA") if method == "mixlora" else dict(LORA, peft_type="LORA")
        inject_mixlora(base, MixLoraConfig(target_modules=TARGETS, **kw), adapter_dtype)
        _randomize_trainable(base, seed + 1)
        if merge_lora:  # what load_for_inference does by default
            from mixlora_ds.model.merge import prepare_for_inference

            prepare_for_inference(base, dtype)
        return base.eval()
    if method == "peft_lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA)
        model_ = get_peft_model(base, cfg, autocast_adapter_dtype=adapter_dtype == torch.float32)
        for n, p in model_.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(adapter_dtype)
                p.requires_grad_(True)
        _randomize_trainable(model_, seed + 1)
        return model_.eval()
    if method == "reference":
        return _reference_mixlora(base, device, adapter_dtype, seed)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _reference_mixlora(base, device: torch.device, adapter_dtype: torch.dtype, seed: int):
    import mixlora

    cfg = {"bias": "none", "peft_type": "MIXLORA", "target_modules": TARGETS, "routing_strategy": "mixlora",
           "act_fn": "silu", "base_model_name_or_path": "random", "task_type": "CAUSAL_LM", **MIXLORA}
    config = mixlora.MixLoraConfig.from_config(cfg)
    config.adapter_name_ = "default"
    config.dtype_ = adapter_dtype
    config.check()
    g = torch.Generator(device="cpu").manual_seed(seed + 1)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(device, adapter_dtype)

    hc, r, E = base.config.hidden_size, MIXLORA["r"], MIXLORA["num_experts"]
    weights = {}
    for i, layer in enumerate(base.model.layers):
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = rnd(E, hc)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, proj)
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = rnd(r, lin.in_features)
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = rnd(lin.out_features, r)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, proj)
            for j in range(E):
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_A.weight"] = rnd(r, lin.in_features)
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_B.weight"] = rnd(lin.out_features, r)
    mixlora.inject_adapter_in_model(base, config, weights)
    base.eval()
    # The reference keeps its experts outside the module tree: model.eval() misses them (dropout on).
    for layer in base.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


# ----------------------------------------------------------------------------------- workloads
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_workload(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompt-like sequences: BOS then random ids, lengths uniform in [min_len, max_len]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, vocab, (L - 1,), generator=g).tolist() for L in lengths]


@torch.inference_mode()
def eval_throughput(model, seqs: list[list[int]], batch_size: int, device: torch.device, profile: bool) -> dict:
    """The evaluator's scoring loop on pre-tokenised prompts; returns examples/s."""
    from mixlora_ds.eval.router_profile import ExpertLoadProfiler
    from mixlora_ds.data.prompt_batch import pad_batch
    from mixlora_ds.eval.scoring import last_token_logits, pick_labels

    label_ids_L = torch.arange(100, 100 + LABELS)
    profiler = ExpertLoadProfiler(model if profile else None)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

    def run(bs):
        for pos in bs:
            batch = pad_batch([seqs[p] for p in pos], 0, "left").to(device)
            logits_BV = last_token_logits(model, batch)
            profiler.observe(model, batch.attention_mask_BS)
            pick_labels(logits_BV, label_ids_L).tolist()  # .tolist() waits for the device, as the evaluator does

    # Warm-up over the whole workload: the first call of each new sequence length pays one-off
    # costs (kernel selection, allocator growth) that would otherwise dominate small runs.
    run(batches)
    sync(device)
    t0 = time.perf_counter()
    run(batches)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"examples": len(seqs), "seconds": seconds, "examples_per_s": len(seqs) / seconds}


def decode_runner(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, device: torch.device, seed: int,
                  cache: str = "dynamic"):
    """Greedy decoding with the KV cache, exactly ``new_tokens`` per row: warms up, then returns a
    function that decodes once and returns the seconds it took."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=0, eos_token_id=2, temperature=None, top_p=None, top_k=None)
    if cache == "static":  # a static KV cache lets Transformers compile the decode step into CUDA graphs
        kw["cache_implementation"] = "static"

    @torch.inference_mode()
    def once() -> float:
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        sync(device)
        assert out.shape[1] == prompt_len + new_tokens
        return time.perf_counter() - t0

    for _ in range(2 if cache == "static" else 1):  # the static cache compiles, then captures CUDA graphs
        once()
    return once


def gen_result(batch: int, new_tokens: int, times: list[float]) -> dict:
    t = statistics.median(times)
    return {"batch": batch, "seconds": t, "tokens_per_s": batch * new_tokens / t, "ms_per_step": 1000 * t / new_tokens,
            "all_seconds": [round(x, 5) for x in times]}


# ----------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, small workloads (smoke test)")
    p.add_argument("--model", choices=sorted(MODELS), default="7b")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=16, help="the reference's evaluate_batch_size")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--no-profile", action="store_true", help="skip the expert-load profile in evaluation")
    p.add_argument("--gen-batches", default="1,16")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="KV cache for generation; static = compiled decode step (CUDA graphs)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-merge-lora", action="store_true", help="keep mixlora_ds's LoRA layers unmerged")
    p.add_argument("--interleave", action="store_true",
                   help="keep every method's model on the device and time generation round-robin "
                        "(method after method, --repeats rounds), so drift of the machine hits all alike")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-gen", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append JSON lines here")
    if p.parse_known_args(argv)[0].tiny:
        # Defaults only: explicit options still win.
        p.set_defaults(model="tiny", device="cpu", dtype="float32", eval_examples=48, min_len=16, max_len=64,
                       gen_batches="1,4", prompt_len=8, new_tokens=8, repeats=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    adapter_dtype = getattr(torch, args.adapter_dtype)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    vocab = MODELS[args.model]["vocab_size"]
    seqs = eval_workload(args.eval_examples, args.min_len, args.max_len, vocab, args.seed)
    gen_batches = [int(b) for b in args.gen_batches.split(",") if b]
    env = {"cache": args.cache, "merge_lora": not args.no_merge_lora, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "model": args.model, "dtype": args.dtype, "adapter_dtype": args.adapter_dtype}
    if args.cache == "static":  # one compiled decode step per model and batch size
        limit = 8 * len(methods) * len(gen_batches)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    gen_args = (args.prompt_len, args.new_tokens, vocab, device, args.seed, args.cache)

    def write(row):
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def start(method):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model = build(method, args.model, device, dtype, adapter_dtype, args.seed, merge_lora=not args.no_merge_lora)
        row = {"bench": "eval_generate", **env, "method": method, "build_s": round(time.perf_counter() - t0, 2)}
        if not args.skip_eval:
            row["eval"] = eval_throughput(model, seqs, args.eval_batch, device,
                                          profile=not args.no_profile and method == "mixlora")
        return model, row

    rows = []
    if args.interleave:
        models, runners = {}, {}
        for method in methods:
            models[method], row = start(method)
            rows.append(row)
            if not args.skip_gen:
                runners.update({(method, b): decode_runner(models[method], b, *gen_args) for b in gen_batches})
        times = {key: [] for key in runners}
        for _ in range(args.repeats):
            for key, once in runners.items():
                times[key].append(once())
        for row in rows:
            if not args.skip_gen:
                row["generate"] = [gen_result(b, args.new_tokens, times[(row["method"], b)]) for b in gen_batches]
            row["interleaved"] = True
            write(row)
    for method in [] if args.interleave else methods:
        model, row = start(method)
        if not args.skip_gen:
            row["generate"] = []
            for b in gen_batches:
                once = decode_runner(model, b, *gen_args)
                row["generate"].append(gen_result(b, args.new_tokens, [once() for _ in range(args.repeats)]))
            # The runner closes over the model: dropped here, or this model would stay allocated
            # while the next method is built and measured (its peak would include this one).
            del once
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        write(row)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(summary_table(rows, gen_batches))
    return 0


def summary_table(rows: list[dict], gen_batches: list[int]) -> str:
    """Markdown: eval examples/s, generation tokens/s per batch and time relative to the base model."""
    base = next((r for r in rows if r["method"] == "base"), None)
    head = "| method | eval ex/s |" + "".join(f" gen tok/s b={b} | time vs base b={b} |" for b in gen_batches)
    lines = [head, "|---" * (2 + 2 * len(gen_batches)) + "|"]
    for r in rows:
        cells = [r["method"], f"{r['eval']['examples_per_s']:.1f}" if "eval" in r else "-"]
        for i, _ in enumerate(gen_batches):
            g = r.get("generate")
            if not g:
                cells += ["-", "-"]
                continue
            ratio = (g[i]["seconds"] / base["generate"][i]["seconds"]) if base and base.get("generate") else None
            cells += [f"{g[i]['tokens_per_s']:.1f}", f"{ratio:.2f}x" if ratio else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
