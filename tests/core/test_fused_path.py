"""The fused compute path on CPU: its custom op (GEMMs plus the PyTorch element-wise passes) against
the float64 per-expert reference, its output dropout, whole models against the loop path, and what it
cannot cover. The Triton passes are tested on GPU (``tests/gpu``) and through Triton's interpreter
(``fused_interpreter_probe.py``, run by ``scripts/run_gpu_tests.sh``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.model.aux_loss import mixlora_aux_loss
from mixlora_ds.model.experts_fused import KERNEL_ACTIVATIONS, fused_unsupported_reason
from mixlora_ds.model.kernels.pair_op import uses_triton
from mixlora_ds.model.moe import moe_blocks, set_compute_path
from tests.core.pair_dropout import check_statistics, keep_mask
from tests.core.pair_reference import compare, grads_of, make_problem, reference, rel_err, run_fused
from tests.core.tiny_models import VOCAB, randomize_adapter, targets_for, tiny_model

OP_CASES = [
    # (T, K, E, r, D, I, missing, unused_expert, act)
    (37, 2, 4, 4, 24, 40, (), 2, "silu"),  # odd T, an expert with no token, zero-weight slots
    (21, 3, 3, 4, 16, 24, (), None, "gelu_tanh"),  # E*r not a power of two
    (19, 1, 4, 4, 16, 20, ("l3",), None, "silu"),  # top-1
    (17, 2, 4, 4, 16, 20, ("out",), None, "silu"),
    (9, 2, 4, 4, 16, 20, ("l1", "l3"), None, "gelu_tanh"),
    (1, 2, 4, 4, 16, 20, (), None, "silu"),  # one token
]
# float64 through the op is exact up to the fp32 routing weights the harness passes; fp32 sums differ
# from float64 by ~1e-7.
TOL = {torch.float64: 1e-7, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", OP_CASES)
def test_op_matches_float64_reference(case, dtype):
    T, K, E, r, D, I, missing, unused, act = case
    problem = make_problem(T, K, E, r, D, I, dtype=dtype, missing=missing, unused_expert=unused)
    assert not uses_triton(problem["gate"].to(dtype))  # the PyTorch passes on CPU
    compare(problem, act, TOL[dtype])


def test_op_on_no_tokens():
    """A rank whose experts got no token still runs the op (expert parallelism)."""
    problem = make_problem(0, 2, 4, 4, 16, 20)
    mixed, delta = run_fused(problem, "silu")
    assert mixed.shape == (0, 20) and delta.shape == (0, 16)
    grads = grads_of((mixed, delta), problem)
    assert all(g is None or not g.any() for g in grads)


def test_output_dropout_is_a_dropout_and_backward_reuses_its_mask():
    p = 0.3
    check_statistics(keep_mask(11, 512, 2, 64, p, "cpu"), p)
    T, K, I = 40, 2, 16
    problem = make_problem(T, K, 2, 4, 16, I, seed=6)
    torch.manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item()
    keep = keep_mask(seed, T, K, I, p, "cpu")
    torch.manual_seed(0)  # fused_pair_math draws the same seed: forward and backward must use `keep`
    fused = run_fused(problem, "silu", p)
    want = [o for o in reference(problem, "silu", keep, p) if o is not None]
    for f, w in zip(fused, want):
        assert rel_err(f, w) < 1e-5
    for gf, gw in zip(grads_of(fused, problem), grads_of(want, problem)):
        assert rel_err(gf, gw) < 1e-5


MODEL_CASES = [
    ("llama", dict(top_k=2)),
    ("llama", dict(top_k=1)),
    ("llama", dict(routing_strategy="mixlora-dynamic", top_p=0.6)),
    ("llama", dict(routing_strategy="mixlora-switch", expert_capacity=3)),
    ("llama", dict(top_k=2, target_modules=["q_proj", "gate_proj", "down_proj"])),
    ("gemma2", dict(top_k=2)),  # gelu_pytorch_tanh
]


def _model(model_type="llama", dtype=torch.float32, **overrides):
    model = tiny_model(model_type).to(dtype)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2, target_modules=targets_for(model_type))
    inject_mixlora(model, MixLoraConfig(**kwargs | overrides), adapter_dtype=dtype)
    randomize_adapter(model)
    return model.train()


def _step(model_type, overrides, path, dtype):
    model = _model(model_type, dtype, **overrides)
    set_compute_path(model, path)
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    mask[1, -5:] = 0  # (left padding gives NaN rows in float64 attention, the truth here)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to another path would warn
        logits = model(ids, attention_mask=mask).logits
    labels = ids.masked_fill(mask == 0, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), labels[:, 1:].reshape(-1))
    (loss + mixlora_aux_loss(model, mask)).backward()
    return logits.detach().double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type,overrides", MODEL_CASES)
def test_fused_model_matches_loop(model_type, overrides):
    """float64: logits and every gradient within 1e-9 of the loop path (the maths). fp32: within 1e-4
    of the fp32 loop path (rounding only; fp32 against float64 can route differently under switch
    capacity, and a top-1 router's gradient cancels to ~1e-5 relative in either path)."""
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        truth_logits, truth_grads = _step(model_type, overrides, "loop", dtype)
        logits, grads = _step(model_type, overrides, "fused", dtype)
        assert rel_err(logits, truth_logits) <= tol
        assert grads.keys() == truth_grads.keys()
        for name, g in truth_grads.items():
            assert rel_err(grads[name], g) <= tol, (dtype, name)
        assert sum(int(g.abs().max() > 0) for g in truth_grads.values()) > len(truth_grads) // 2


@pytest.mark.parametrize("model_type,expected", [
    ("llama", None),  # gated SiLU
    ("gemma2", None),  # gated tanh-GELU
    ("phi", "it covers gated FFNs with separate gate and up projections only"),  # GELU, not gated
    ("phi3", "it covers gated FFNs with separate gate and up projections only"),  # fused gate_up
])
def test_unsupported_reason_names_what_is_missing(model_type, expected):
    block = moe_blocks(_model(model_type))[0]
    assert fused_unsupported_reason(block.ffn, block.experts, block.act_fn) == expected


def test_unsupported_block_falls_back_to_dense_with_one_warning():
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    results = {}
    for path in ("dense", "fused"):
        model = _model("phi")
        set_compute_path(model, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                logits = model(ids).logits
        fallback = [w for w in caught if "falls back to 'dense'" in str(w.message)]
        assert len(fallback) == (len(moe_blocks(model)) if path == "fused" else 0)  # once per block, not per call
        logits.square().mean().backward()
        results[path] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["fused"][0], results["dense"][0], rtol=0, atol=0)
    for name, g in results["dense"][1].items():
        torch.testing.assert_close(results["fused"][1][name], g, rtol=0, atol=0)


def test_unsupported_activation_is_named():
    block = moe_blocks(_model())[0]
    reason = fused_unsupported_reason(block.ffn, block.experts, "relu")
    assert "relu" in reason and all(name in reason for name in KERNEL_ACTIVATIONS)


def test_dora_experts_refuse_the_fused_path():
    model = _model(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        set_compute_path(model, "fused")


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="compute path must be one of"):
        set_compute_path(_model(), "triton")
