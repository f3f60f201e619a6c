"""The fused compute path's interface on CPU: where it cannot run it says why and falls back to the
dense path (same numbers); what it cannot cover is named. Its kernels are tested on GPU
(``tests/gpu``) and through Triton's interpreter (``fused_interpreter_probe.py``, run by
``scripts/run_gpu_tests.sh``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.model.experts_fused import KERNEL_ACTIVATIONS, fused_unsupported_reason
from mixlora_ds.model.moe import moe_blocks, set_compute_path
from tests.core.tiny_models import VOCAB, randomize_adapter, targets_for, tiny_model

CPU_REASONS = {"triton is not installed", "the kernels need CUDA tensors"}


def _model(model_type="llama", **overrides):
    model = tiny_model(model_type)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2, target_modules=targets_for(model_type))
    inject_mixlora(model, MixLoraConfig(**kwargs | overrides))
    randomize_adapter(model)
    return model.train()


def test_fused_falls_back_to_dense_on_cpu_with_one_warning():
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    results = {}
    for path in ("dense", "fused"):
        model = _model()
        set_compute_path(model, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                logits = model(ids).logits
        fallback = [w for w in caught if "falls back to 'dense'" in str(w.message)]
        assert len(fallback) == (2 if path == "fused" else 0)  # once per block (2 layers), not per call
        logits.square().mean().backward()
        results[path] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["fused"][0], results["dense"][0], rtol=0, atol=0)
    for name, g in results["dense"][1].items():
        torch.testing.assert_close(results["fused"][1][name], g, rtol=0, atol=0)


@pytest.mark.parametrize("model_type,expected", [
    ("llama", CPU_REASONS),  # gated SiLU: only the device stops it here
    ("gemma2", CPU_REASONS),  # gated tanh-GELU
    ("phi", {"the kernels cover gated FFNs with separate gate and up projections only"}),  # GELU, not gated
    ("phi3", {"the kernels cover gated FFNs with separate gate and up projections only"}),  # fused gate_up
])
def test_unsupported_reason_names_what_is_missing(model_type, expected):
    block = moe_blocks(_model(model_type))[0]
    x = torch.zeros(3, block.router.weight.shape[1])
    assert fused_unsupported_reason(block.ffn, block.experts, block.act_fn, x) in expected


def test_unsupported_activation_and_dtype_are_named():
    block = moe_blocks(_model())[0]
    x = torch.zeros(3, block.router.weight.shape[1])
    reason = fused_unsupported_reason(block.ffn, block.experts, "relu", x)
    assert "relu" in reason and all(name in reason for name in KERNEL_ACTIVATIONS)
    assert "float64" in fused_unsupported_reason(block.ffn, block.experts, "silu", x.double())


def test_dora_experts_refuse_the_fused_path():
    model = _model(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        set_compute_path(model, "fused")


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="compute path must be one of"):
        set_compute_path(_model(), "triton")
