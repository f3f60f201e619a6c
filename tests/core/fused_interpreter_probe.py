"""Run with TRITON_INTERPRET=1 (set before triton is imported): the fused kernels on CPU tensors through
Triton's interpreter, against the float64 per-expert references. Prints OK; fails with an assertion.
``--kernels-only`` leaves out the whole-model case (what CI runs, to stay fast)."""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mixlora_ds import MixLoraConfig, inject_mixlora  # noqa: E402
from mixlora_ds.model.moe import set_compute_path  # noqa: E402
from tests.core.pair_dropout import check_statistics, keep_mask  # noqa: E402
from tests.core.pair_reference import compare, make_problem  # noqa: E402
from tests.core.tiny_models import VOCAB, randomize_adapter, tiny_model  # noqa: E402


def kernel_cases():
    # odd token count, an expert with no token, zero-weight slots, missing LoRAs, E*r not a power of 2
    compare(make_problem(37, 2, 4, 4, 24, 40, unused_expert=2), "silu", 1e-5)
    compare(make_problem(21, 3, 3, 4, 16, 24, seed=1), "gelu_tanh", 1e-5)
    compare(make_problem(19, 1, 4, 4, 16, 20, seed=2, missing=("l3",)), "silu", 1e-5)
    compare(make_problem(17, 2, 4, 4, 16, 20, seed=3, missing=("out",)), "silu", 1e-5)
    compare(make_problem(9, 2, 4, 4, 16, 20, seed=4, missing=("l1", "l3")), "gelu_tanh", 1e-5)


def dropout_case():
    T, K, I, p = 40, 2, 16, 0.3
    problem = make_problem(T, K, 2, 4, 16, I, seed=6)
    keep = keep_mask(123, T, K, I, p, "cpu")
    check_statistics(keep_mask(7, 256, 2, 16, p, "cpu"), p)
    torch.manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item()
    keep = keep_mask(seed, T, K, I, p, "cpu")
    torch.manual_seed(0)  # fused_pair_math draws the same seed: forward and backward use `keep`
    compare_with_seed(problem, keep, p)


def compare_with_seed(problem, keep, p):
    import tests.core.pair_reference as ref

    fused = ref.run_fused(problem, "silu", p)
    want = [o for o in ref.reference(problem, "silu", keep, p) if o is not None]
    for f, w in zip(fused, want):
        assert ref.rel_err(f, w) < 1e-5
    for gf, gw in zip(ref.grads_of(fused, problem), ref.grads_of(want, problem)):
        assert ref.rel_err(gf, gw) < 1e-5


def model_case():
    """A whole tiny LLaMA: the fused path (fp32) equals the loop path, logits and every gradient."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    results = {}
    for path in ("loop", "fused"):
        model = tiny_model("llama")
        inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2))
        randomize_adapter(model)
        set_compute_path(model, path)
        model.train()
        logits = model(ids).logits
        logits.square().mean().backward()
        results[path] = (logits.detach(), {n: q.grad for n, q in model.named_parameters() if q.requires_grad})
    assert (results["loop"][0] - results["fused"][0]).abs().max().item() <= 1e-5
    for name, g in results["loop"][1].items():
        assert (g - results["fused"][1][name]).abs().max().item() <= 1e-5, name


if __name__ == "__main__":
    kernel_cases()
    dropout_case()
    if "--kernels-only" not in sys.argv:
        model_case()
    print("OK")
