"""``prepare_for_inference``: merged LoRA/DoRA layers and snapshotted expert stacks compute what the
unmerged adapter computes (float64, every family), and the prepared model refuses to be saved."""

from __future__ import annotations

import copy

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter
from mixlora_ds.model.experts import ExpertLoraStack
from mixlora_ds.model.lora import LoraLinear
from mixlora_ds.model.merge import prepare_for_inference
from mixlora_ds.model.moe import moe_blocks

from .tiny_models import FAMILIES, VOCAB, randomize_adapter, targets_for, tiny_model

ADAPTERS = {
    "mixlora": dict(peft_type="MIXLORA", r=4, lora_alpha=8, num_experts=4, top_k=2),
    "lora": dict(peft_type="LORA", r=4, lora_alpha=8),
    "dora": dict(peft_type="LORA", r=4, lora_alpha=8, use_dora=True),
}


def _adapted(model_type: str, kind: str, base_dtype=torch.float64, adapter_dtype=torch.float64):
    model = tiny_model(model_type).to(base_dtype)
    inject_mixlora(model, MixLoraConfig(target_modules=targets_for(model_type), lora_dropout=0.1, **ADAPTERS[kind]),
                   adapter_dtype)
    randomize_adapter(model)
    return model.eval()


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_prepared_model_gives_the_unmerged_logits(model_type, kind):
    model = _adapted(model_type, kind)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    prepared = prepare_for_inference(copy.deepcopy(model))
    assert not any(isinstance(m, LoraLinear) for m in prepared.modules())
    assert not any(p.requires_grad for p in prepared.parameters())
    # Gate and up projections fused into one pair where the family has both (not phi3's gate_up, phi's
    # fc1); every other expert stack keeps its own snapshot.
    blocks = moe_blocks(prepared)
    assert (kind == "mixlora") == bool(blocks)
    for block in blocks:
        fused = block.inference_in_A is not None
        assert fused == (model_type not in ("phi3", "phi"))
        rest = [s for n, s in block.experts.items() if not (fused and n in block.ffn.input_names)]
        assert rest and all(s.inference_A is not None for s in rest)
    with torch.no_grad():
        got = prepared(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_bf16_prepared_model_is_as_accurate_as_the_unmerged_one():
    """Against a float64 truth, merged bf16 weights (rounded once) err no more than the unmerged bf16
    model does; medians, because a near-tie in the router may flip a token either way."""
    truth = _adapted("llama", "mixlora")
    bf16 = copy.deepcopy(truth).to(torch.bfloat16)
    for name, p in bf16.named_parameters():  # bf16 base, fp32 adapter: what load_for_inference gives on a GPU
        if "lora_" in name or "router" in name:
            p.data = p.data.float()
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = truth(input_ids=ids).logits
        unmerged = (bf16(input_ids=ids).logits.double() - expected).abs().median()
        merged = (prepare_for_inference(bf16, torch.bfloat16)(input_ids=ids).logits.double() - expected).abs().median()
    assert merged <= 1.5 * unmerged + 1e-4, (merged, unmerged)


def test_training_mode_drops_the_snapshots():
    """A snapshot would go stale once the experts train again; ``train()`` drops it."""
    model = prepare_for_inference(_adapted("llama", "mixlora"))
    model.train()
    assert all(b.inference_in_A is None for b in moe_blocks(model))
    assert all(s.inference_A is None for s in model.modules() if isinstance(s, ExpertLoraStack))


def test_prepared_model_refuses_to_save_its_adapter(tmp_path):
    model = prepare_for_inference(_adapted("llama", "lora"))
    with pytest.raises(ValueError, match="merged into its weights"):
        save_mixlora_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
