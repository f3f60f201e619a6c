"""MixLoRA on real pretrained weights (SmolLM2-135M-Instruct): injection leaves the model as it was,
and an adapter with non-zero weights gives the reference ``mixlora`` 0.2.3 logits."""

from __future__ import annotations

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter
from mixlora_ds.data.tokenizer_io import load_tokenizer
from mixlora_ds.inference import load_base_model
from tests.reference_oracle import attach_reference_adapter

pytestmark = pytest.mark.slow
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat_ids(tok) -> torch.Tensor:
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok.encode(text, add_special_tokens=False)])


def fresh_base(path):
    return load_base_model(path, dtype="float32", device="cpu")


def test_converted_base_answers_like_the_gguf_model(smollm2_base):
    from mixlora_ds.gguf_base import load_gguf, smollm2_gguf_path

    gguf_model, _ = load_gguf(smollm2_gguf_path())
    base, tok = fresh_base(smollm2_base), load_tokenizer(smollm2_base)
    ids = chat_ids(tok)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, gguf_model.eval()(ids).logits)
    assert "chat_template" in {f.stem for f in smollm2_base.iterdir()}


def test_injection_at_init_changes_neither_logits_nor_greedy_answer(smollm2_base):
    base, tok = fresh_base(smollm2_base), load_tokenizer(smollm2_base)
    ids = chat_ids(tok)
    greedy = dict(max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        logits = base(ids).logits
        answer = base.generate(ids, **greedy)[0, ids.shape[1]:]
    assert "Paris" in tok.decode(answer)  # the pretrained model really answers
    inject_mixlora(base, MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2, target_modules=TARGETS))
    base.eval()
    with torch.no_grad():
        assert (base(ids).logits - logits).abs().max().item() <= 1e-4
        assert torch.equal(base.generate(ids, **greedy)[0, ids.shape[1]:], answer)


def test_trained_adapter_gives_reference_logits(smollm2_base, tmp_path):
    ours, tok = fresh_base(smollm2_base), load_tokenizer(smollm2_base)
    inject_mixlora(ours, MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2, target_modules=TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero LoRA B and router: every expert and LoRA changes the output
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ours.eval()
    save_mixlora_adapter(ours, tmp_path / "adapter")
    ref = attach_reference_adapter(fresh_base(smollm2_base), tmp_path / "adapter")
    plain = fresh_base(smollm2_base)
    ids = torch.cat([chat_ids(tok), torch.tensor([tok.encode(" Paris is the capital.", add_special_tokens=False)])], 1)
    with torch.no_grad():
        ours_logits, ref_logits, plain_logits = ours(ids).logits, ref(ids).logits, plain(ids).logits
    assert (ours_logits - plain_logits).abs().max().item() > 0.5  # the adapter really acts
    assert (ours_logits - ref_logits).abs().max().item() <= 1e-3
