"""GPU tests (marker ``gpu``; ``scripts/run_gpu_tests.sh``): the fused Triton kernels against the float64
per-expert references, and the other GPU-only paths (compiled per-pair math, bf16 inference form).

Tolerances: fp32 (IEEE GEMMs, fp32 element-wise passes) within 1e-5 relative norm of float64; bf16 within 2e-2 (operands
rounded to bf16 before every dot, fp32 accumulation; a bf16 ulp is 7.8e-3).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.model.aux_loss import mixlora_aux_loss
from mixlora_ds.model.merge import prepare_for_inference
from mixlora_ds.model.moe import moe_blocks, set_compute_path
from tests.core.pair_dropout import check_statistics, keep_mask
from tests.core.pair_reference import compare, grads_of, make_problem, reference, rel_err, run_fused
from tests.core.tiny_models import VOCAB, randomize_adapter, targets_for, tiny_model

pytestmark = pytest.mark.gpu
FP32_TOL, BF16_TOL = 1e-5, 2e-2


@pytest.fixture(autouse=True, scope="module")
def _needs_cuda():
    assert torch.cuda.is_available(), "gpu tests need a CUDA device (CPU CI deselects them with -m 'not gpu')"
    import mixlora_ds.model.kernels.triton_pair  # noqa: F401  (fails loudly without triton)


KERNEL_CASES = [
    # (T, K, E, r, D, I, missing, unused_expert, act)
    (333, 2, 8, 16, 256, 688, (), 5, "silu"),  # odd T, an expert with no token
    (1031, 2, 8, 16, 512, 1376, (), None, "gelu_tanh"),
    (257, 1, 8, 16, 128, 344, (), None, "silu"),  # top-1 / switch-like
    (129, 4, 16, 16, 128, 256, (), 3, "silu"),  # 16 experts, E*r = 256
    (100, 2, 6, 8, 128, 200, (), None, "silu"),  # E*r = 48, padded to 64
    (77, 2, 8, 16, 128, 256, ("l3",), None, "gelu_tanh"),
    (77, 2, 8, 16, 128, 256, ("out",), None, "silu"),
    (1, 2, 8, 16, 128, 256, (), None, "silu"),  # one token
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_float64_reference(case, dtype):
    T, K, E, r, D, I, missing, unused, act = case
    problem = make_problem(T, K, E, r, D, I, dtype=dtype, device="cuda", missing=missing, unused_expert=unused)
    compare(problem, act, FP32_TOL if dtype == torch.float32 else BF16_TOL)


def test_output_dropout_is_a_dropout_and_backward_reuses_its_mask():
    p = 0.3
    check_statistics(keep_mask(11, 4096, 2, 64, p, "cuda"), p)
    T, K, I = 300, 2, 64
    problem = make_problem(T, K, 8, 8, 96, I, device="cuda", seed=3)
    torch.manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, (1,), device="cuda", dtype=torch.int64).item()
    keep = keep_mask(seed, T, K, I, p, "cuda").cpu()
    torch.manual_seed(0)  # fused_pair_math draws the same seed
    fused = run_fused(problem, "silu", p)
    want = [o for o in reference(problem, "silu", keep, p) if o is not None]
    for f, w in zip(fused, want):
        assert rel_err(f, w) < FP32_TOL
    for gf, gw in zip(grads_of(fused, problem), grads_of(want, problem)):
        assert rel_err(gf, gw) < FP32_TOL


# ---- whole models: every routing strategy, padding, compile, checkpointing, bf16 -------------------

MODEL_CASES = [
    ("llama", dict(num_experts=4, top_k=2)),
    ("llama", dict(num_experts=4, top_k=1)),
    ("llama", dict(num_experts=8, top_k=2)),
    ("llama", dict(num_experts=4, routing_strategy="mixlora-dynamic", top_p=0.6)),
    ("llama", dict(num_experts=4, routing_strategy="mixlora-switch", expert_capacity=3)),
    ("llama", dict(num_experts=4, top_k=2, target_modules=["q_proj", "gate_proj", "down_proj"])),
    ("qwen2", dict(num_experts=4, top_k=2)),
    ("gemma2", dict(num_experts=4, top_k=2)),  # gelu_pytorch_tanh
]


def _ids(batch=3, seq=11, seed=0):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    mask[1, -5:] = 0  # (left padding gives NaN rows in float64 attention, the truth here)
    return ids, mask


def _train_step(model_type, overrides, path, dtype, device, dropout=0.0, compile_layers=False, checkpointing=False,
                rng_seed=0, layers=None):
    model = tiny_model(model_type, **({} if layers is None else {"num_hidden_layers": layers})).to(dtype)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets_for(model_type))
    kwargs.update(overrides)
    inject_mixlora(model, MixLoraConfig(**kwargs), adapter_dtype=dtype)
    randomize_adapter(model)
    model.to(device)
    set_compute_path(model, path)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers:
        for layer in model.model.layers:
            layer.compile()
    ids, mask = (t.to(device) for t in _ids())
    torch.manual_seed(rng_seed)
    out = model(ids, attention_mask=mask)
    labels = ids.masked_fill(mask == 0, -100)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(),
                                             labels[:, 1:].reshape(-1)) + mixlora_aux_loss(model, mask)
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}
    blocks = moe_blocks(model)
    return out.logits.detach().double().cpu(), grads, blocks


def _assert_close(a, b, tol):
    logits_a, grads_a = a
    logits_b, grads_b = b
    assert rel_err(logits_a, logits_b) <= tol
    assert grads_a.keys() == grads_b.keys()
    flowing = 0
    for name in grads_b:
        assert rel_err(grads_a[name], grads_b[name]) <= tol, name
        flowing += int(grads_b[name].abs().max() > 0)
    assert flowing > len(grads_b) // 2


@pytest.mark.parametrize("model_type,overrides", MODEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_matches_loop(model_type, overrides, dtype):
    """Against the loop path on the GPU in the same dtype: fp32 within 1e-4 (rounding only: against
    float64, switch capacity can route differently and a top-1 router's gradient cancels to ~1e-5
    relative in either path; the float64 maths is checked on CPU), bf16 within 5e-2 on one decoder
    layer (with two, the paths' different rounding of the first layer's output can flip a near tie
    in the second layer's top-k, and a flipped token moves every gradient of that layer; the first
    layer's routing is the same for both, its inputs being)."""
    layers = 1 if dtype == torch.bfloat16 else None
    truth = _train_step(model_type, overrides, "loop", dtype, "cuda", layers=layers)[:2]
    logits, grads, blocks = _train_step(model_type, overrides, "fused", dtype, "cuda", layers=layers)
    assert all(b._fused_ok() for b in blocks)  # no fallback
    _assert_close((logits, grads), truth, 1e-4 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("strategy", [dict(top_k=2), dict(routing_strategy="mixlora-dynamic", top_p=0.6),
                                      dict(routing_strategy="mixlora-switch", expert_capacity=3)])
def test_fused_under_compiled_layers_and_checkpointing(strategy):
    """Compiled decoder layers and activation checkpointing, with LoRA dropout on: same maths as eager."""
    overrides = dict(num_experts=4, **strategy)
    eager = _train_step("llama", overrides, "fused", torch.float32, "cuda", dropout=0.1)[:2]
    ckpt = _train_step("llama", overrides, "fused", torch.float32, "cuda", dropout=0.1, checkpointing=True)[:2]
    _assert_close(ckpt, eager, 1e-5)
    compiled = _train_step("llama", overrides, "fused", torch.float32, "cuda", compile_layers=True)[:2]
    _assert_close(compiled, _train_step("llama", overrides, "fused", torch.float32, "cuda")[:2], 1e-5)
    both = _train_step("llama", overrides, "fused", torch.float32, "cuda", dropout=0.1, compile_layers=True,
                       checkpointing=True)[:2]
    assert all(torch.isfinite(g).all() for g in both[1].values())


def test_compiled_dense_path_matches_float64_loop():
    """The existing GPU option: torch.compile of the masked-dense per-pair math."""
    truth = _train_step("llama", dict(num_experts=4, top_k=2), "loop", torch.float64, "cpu")[:2]
    model_type, overrides = "llama", dict(num_experts=4, top_k=2)
    model = tiny_model(model_type).to(torch.float32)
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets_for(model_type),
                                        **overrides))
    randomize_adapter(model)
    model.to("cuda").train()
    set_compute_path(model, "dense", compiled=True)
    ids, mask = (t.cuda() for t in _ids())
    out = model(ids, attention_mask=mask)
    labels = ids.masked_fill(mask == 0, -100)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    (loss + mixlora_aux_loss(model, mask)).backward()
    grads = {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.requires_grad}
    _assert_close((out.logits.detach().double().cpu(), grads), truth, 1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_inference_form_matches_float64(compiled):
    """The fused inference form (``prepare_for_inference``) in bf16 on GPU, eager and compiled; one
    decoder layer, so bf16 rounding cannot flip a later layer's routing (see above)."""
    truth = tiny_model("llama", num_hidden_layers=1).double()
    inject_mixlora(truth, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2,
                                        target_modules=targets_for("llama")), torch.float64)
    randomize_adapter(truth)
    truth.eval()
    ids, mask = _ids()
    with torch.no_grad():
        expected = truth(ids, attention_mask=mask).logits
    prepared = prepare_for_inference(copy.deepcopy(truth).to(torch.bfloat16)).cuda()
    for block in moe_blocks(prepared):
        assert block.fused_ffn is not None
        block.compiled = compiled
    with torch.no_grad():
        got = prepared(ids.cuda(), attention_mask=mask.cuda()).logits
    keep = mask.bool()
    assert rel_err(got.double().cpu()[keep], expected[keep]) <= 5e-2


def test_default_path_is_fused_on_cuda():
    """``auto`` (the default) runs the fused op on CUDA: the same numbers as asking for it by name."""
    overrides = dict(num_experts=4, top_k=2)
    fused = _train_step("llama", overrides, "fused", torch.float32, "cuda")[:2]
    auto = _train_step("llama", overrides, "auto", torch.float32, "cuda")[:2]
    _assert_close(auto, fused, 1e-6)
