"""Preparing a MixLoRA model for inference keeps no second copy of the frozen weights: what it adds
is at most one copy of the expert weights (in the fused matrices), counted in storage bytes."""

from __future__ import annotations

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.model.merge import prepare_for_inference
from mixlora_ds.model.moe import moe_blocks
from tests.core.tiny_models import randomize_adapter, targets_for, tiny_model


def _storage_bytes(model) -> int:
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def test_prepared_model_adds_at_most_the_expert_weights():
    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=targets_for("llama")))
    randomize_adapter(model)
    before = _storage_bytes(model)
    expert_bytes = sum(p.numel() * p.element_size() for b in moe_blocks(model) for p in b.experts.parameters())
    prepare_for_inference(model)
    after = _storage_bytes(model)
    assert after <= before + expert_bytes, (before, after, expert_bytes)
    assert after > before - expert_bytes  # the count saw the model (sanity of the measure)
