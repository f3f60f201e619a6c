"""Injection: equals the base model at init, trains only adapter parameters, respects eval mode."""

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora
from tests.core.tiny_models import FAMILIES, VOCAB, targets_for, tiny_model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_equals_base_at_init_and_only_adapter_trains(model_type):
    base = tiny_model(model_type)
    model = tiny_model(model_type, state_dict=base.state_dict())
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, target_modules=targets_for(model_type)))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max().item() <= 1e-5
    model.train()
    model(ids).logits.square().mean().backward()
    for name, p in model.named_parameters():
        is_adapter = any(k in name for k in ("lora_", "router."))
        assert p.requires_grad == is_adapter, name
        if not is_adapter:
            assert p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if "router" in n)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_modules_visible_to_state_dict_and_to_and_eval():
    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, lora_dropout=0.5))
    keys = model.state_dict().keys()
    assert "model.layers.0.mlp.router.weight" in keys
    assert "model.layers.0.mlp.experts.gate_proj.lora_A" in keys
    assert "model.layers.0.mlp.base_mlp.gate_proj.weight" in keys
    model.to(torch.float64)
    assert model.model.layers[1].mlp.experts["down_proj"].lora_B.dtype == torch.float64
    model.to(torch.float32)
    ids = torch.randint(3, VOCAB, (1, 6))
    from tests.core.tiny_models import randomize_adapter

    randomize_adapter(model)
    model.eval()  # dropout off everywhere (the reference's dict-held experts missed this)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_inject_reads_no_weight_values():
    """Injection works on a model whose base weights are meta tensors (as empty as ZeRO-3 placeholders)."""
    from tests.core.tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4))
    assert model.model.layers[0].mlp.experts["up_proj"].lora_A.shape == (4, 4, 64)


def test_inference_weight_cache_follows_weight_updates():
    """A frozen adapter's prepared weights are cached for inference; an in-place update invalidates them,
    and trainable weights are never cached (DeepSpeed updates them through .data, unseen by versions)."""
    from tests.core.tiny_models import randomize_adapter

    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4))
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        first = model(ids := torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))).logits
        for p in trainable:
            p.data = p.data + 0.5  # as an optimizer writing .data would
        assert not torch.allclose(model(ids).logits, first)
    for p in trainable:
        p.requires_grad_(False)
    with torch.no_grad():
        before = model(ids).logits
    for p in trainable:
        p.requires_grad_(True)  # randomize_adapter writes only trainable tensors
    randomize_adapter(model, seed=7)
    for p in trainable:
        p.requires_grad_(False)  # in-place copy_ into every adapter tensor
    with torch.no_grad():
        cached = model(ids).logits
    fresh = model(ids).logits.detach()  # grad-enabled forward never uses the cache
    assert not torch.allclose(before, cached)
    assert torch.allclose(cached, fresh, atol=1e-6)
