"""``prepare_for_inference``: merged LoRA/DoRA layers and fused MixLoRA blocks compute what the
unmerged adapter computes (float64, every family), and the prepared model refuses to be saved."""

from __future__ import annotations

import copy

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter
from mixlora_ds.model.pair_math import _COMPILED
from mixlora_ds.model.fused_ffn import fused_ffn_math
from mixlora_ds.model.lora import LoraLinear
from mixlora_ds.model.merge import prepare_for_inference
from mixlora_ds.model.moe import moe_blocks, set_compute_path

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
    # Every MixLoRA block runs its fused form, whose matrices hold the frozen FFN weights (no copy).
    blocks = moe_blocks(prepared)
    assert (kind == "mixlora") == bool(blocks)
    for block in blocks:
        assert block.fused_ffn is not None
        assert _shares_fused_storage(block)
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


def _shares_fused_storage(block) -> bool:
    fused = block.fused_ffn
    ptrs = {fused.W_in.untyped_storage().data_ptr(), fused.W_out.untyped_storage().data_ptr()}
    return all(block.ffn.projection(n).weight.untyped_storage().data_ptr() in ptrs
               for n in block.ffn.input_names + (block.ffn.output_name,))


ROUTINGS = {
    "top-k": dict(top_k=2),
    "top-p": dict(routing_strategy="mixlora-dynamic", top_p=0.6),
    "top-p-unnormalised": dict(routing_strategy="mixlora-dynamic", top_p=0.6, renormalize_top_p=False),
    "switch": dict(routing_strategy="mixlora-switch"),
}


def _mixlora(model_type: str, dtype=torch.float64, **config):
    model = tiny_model(model_type).to(dtype)
    settings = dict(peft_type="MIXLORA", r=4, lora_alpha=8, num_experts=4, lora_dropout=0.1)
    inject_mixlora(model, MixLoraConfig(target_modules=targets_for(model_type), **settings | config), dtype)
    randomize_adapter(model)
    return model.eval()


def _logits(model, seed: int = 2):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_fused_form_equals_the_per_expert_loop(model_type, routing):
    """Against the plain per-expert loop (the readable reference), float64: top-k, top-p (padded
    slots of weight 0, with and without renormalising) and switch routing, every family (phi's
    biased fc1/fc2 included)."""
    model = _mixlora(model_type, **ROUTINGS[routing])
    reference = copy.deepcopy(model)
    set_compute_path(reference, "loop")
    expected = _logits(reference)
    prepared = prepare_for_inference(model)
    assert all(b.fused_ffn is not None for b in moe_blocks(prepared))
    torch.testing.assert_close(_logits(prepared), expected, rtol=1e-10, atol=1e-10)


def test_fused_form_is_skipped_where_it_does_not_apply():
    """DoRA experts rescale each expert's output, which the shared down projection cannot fold:
    those blocks keep the loop path. Activations of another dtype than the prepared one take the
    unfused path. Both give the unprepared logits."""
    dora = _mixlora("llama", expert_lora={"use_dora": True})
    expected = _logits(dora)
    prepare_for_inference(dora)
    assert all(b.fused_ffn is None and b.compute_path == "loop" for b in moe_blocks(dora))
    torch.testing.assert_close(_logits(dora), expected, rtol=1e-10, atol=1e-10)

    model = _mixlora("llama")
    expected = _logits(model)
    prepare_for_inference(model, torch.float32)  # weights stay float64: nothing can be shared
    assert all(b.fused_ffn is None for b in moe_blocks(model))
    torch.testing.assert_close(_logits(model), expected, rtol=1e-10, atol=1e-10)


def test_compiled_fused_form_matches_the_eager_one():
    """What GPUs run by default (``compiled=None`` means on CUDA): the fused math through
    torch.compile, here forced on for the CPU, against the same form run eagerly."""
    model = prepare_for_inference(_mixlora("llama", dtype=torch.float32, **ROUTINGS["top-p"]))
    expected = _logits(model)
    for block in moe_blocks(model):
        block.compiled = True
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    # It really ran compiled: a failed compile would have fallen back to eager (and warned).
    assert _COMPILED.get(fused_ffn_math) not in (None, False)


def test_training_mode_undoes_the_fused_form():
    """The fused form would go stale once the experts train again: ``train()`` drops it and gives the
    base layers standalone weights back, with their values unchanged."""
    model = _adapted("llama", "mixlora")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    frozen = {n: p.clone() for n, p in model.named_parameters() if "base_mlp" in n}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    prepare_for_inference(model).train()
    for block in moe_blocks(model):
        assert block.fused_ffn is None
        for name in block.ffn.input_names + (block.ffn.output_name,):
            assert block.ffn.projection(name).weight.is_contiguous()
    for n, p in model.named_parameters():
        if "base_mlp" in n:
            assert torch.equal(p, frozen[n]), n
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), n
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-10)


def test_prepared_model_refuses_to_save_its_adapter(tmp_path):
    model = prepare_for_inference(_adapted("llama", "lora"))
    with pytest.raises(ValueError, match="merged into its weights"):
        save_mixlora_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
