"""Loading base models and adapters for inference, and the errors bad inputs get."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mixlora_ds.adapter_check import check_adapter
from mixlora_ds.adapter_io import AdapterError
from mixlora_ds.data.prompt_batch import encode_prompt, pad_batch
from mixlora_ds.eval.scoring import last_token_logits
from mixlora_ds.inference import load_base_model, load_for_inference
from mixlora_ds.model.presets import MODEL_PRESETS, build_model_from_config

from .conftest import TINY, make_adapter, randomize_adapter, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_from_config_is_seeded(tokenizer, tmp_path):
    cfg = tiny_config(tokenizer)
    assert _same_weights(build_model_from_config(cfg, seed=5), build_model_from_config(cfg, seed=5))
    assert not _same_weights(build_model_from_config(cfg, seed=5), build_model_from_config(cfg, seed=6))
    # A preset name and a config.json file give the same model as the mapping.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert _same_weights(build_model_from_config(path, seed=5), build_model_from_config(cfg, seed=5))
    preset = build_model_from_config("tiny", seed=1)
    assert preset.config.hidden_size == MODEL_PRESETS["tiny"]["hidden_size"]
    # The tiny preset is the embedded default's model: a run YAML naming it gives the same weights.
    run_yaml = REPO / "configs" / "tiny.yaml"
    assert _same_weights(preset, build_model_from_config(run_yaml, seed=1))
    assert yaml.safe_load(run_yaml.read_text())["model"]["config"] == MODEL_PRESETS["tiny"]
    # bf16 weights are the fp32 draw rounded, so the same seed gives the same base in any dtype.
    bf16 = build_model_from_config(cfg, seed=5, dtype=torch.bfloat16)
    fp32 = build_model_from_config(cfg, seed=5)
    assert torch.equal(bf16.lm_head.weight, fp32.lm_head.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="neither a preset"):
        build_model_from_config("no-such-preset")
    with pytest.raises(ValueError, match="'model_type' is required"):
        build_model_from_config({"hidden_size": 8})


def test_base_model_directory_round_trip(base_dir, tokenizer):
    model = load_base_model(base_dir, dtype="float32", device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert _same_weights(model, build_model_from_config(tiny_config(tokenizer), seed=7))
    with pytest.raises(ValueError, match="no config.json"):
        load_base_model(base_dir.parent, dtype="float32", device="cpu")


def test_tokenizer_found_beside_base_or_given(base_dir, tok_dir, mixlora_dir, tokenizer):
    m1, t1 = load_for_inference(base_dir, adapter=mixlora_dir, dtype="float32", device="cpu")
    m2, t2 = load_for_inference(model_config=tiny_config(tokenizer), seed=7, adapter=mixlora_dir, tokenizer=tok_dir,
                                dtype="float32", device="cpu")
    assert len(t1) == len(t2) == len(tokenizer)
    ids = torch.tensor([encode_prompt(tokenizer, "is the sun warm\nAnswer:")])
    with torch.inference_mode():
        torch.testing.assert_close(m1(input_ids=ids).logits, m2(input_ids=ids).logits)
    with pytest.raises(ValueError, match="no tokenizer found"):
        load_for_inference(model_config=tiny_config(tokenizer), dtype="float32", device="cpu")


def test_vocab_mismatch_is_reported(tok_dir):
    small = dict(TINY, vocab_size=32)
    with pytest.raises(ValueError, match="tokenizer .* has 600 tokens but the model's vocabulary is 32"):
        load_for_inference(model_config=small, tokenizer=tok_dir, dtype="float32", device="cpu")


def test_lora_and_dora_adapters_load_and_change_logits(base_dir, lora_dir, dora_dir, tokenizer):
    base, _ = load_for_inference(base_dir, dtype="float32", device="cpu")
    ids = torch.tensor([encode_prompt(tokenizer, "which stone\nAnswer:")])
    with torch.inference_mode():
        ref = base(input_ids=ids).logits
        for d in (lora_dir, dora_dir):
            model, _ = load_for_inference(base_dir, adapter=d, dtype="float32", device="cpu")
            assert model.mixlora_config.peft_type == "LORA"
            assert (model(input_ids=ids).logits - ref).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ bad adapters
def test_missing_adapter_files(base_dir, mixlora_dir, tmp_path):
    model = load_base_model(base_dir, dtype="float32", device="cpu")
    with pytest.raises(AdapterError, match="adapter directory not found"):
        check_adapter(model, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json: adapter config not found"):
        check_adapter(model, empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(mixlora_dir / "adapter_config.json", no_weights)
    with pytest.raises(AdapterError, match="no adapter_model.safetensors or adapter_model.bin"):
        check_adapter(model, no_weights)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(mixlora_dir, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: cannot read adapter weights"):
        check_adapter(model, corrupt)
    bad_json = tmp_path / "bad_json"
    shutil.copytree(mixlora_dir, bad_json)
    (bad_json / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterError, match="invalid JSON"):
        check_adapter(model, bad_json)


def test_adapter_for_another_hidden_size(tmp_path, tokenizer):
    wide = tmp_path / "wide_base"
    build_model_from_config(dict(tiny_config(tokenizer), hidden_size=96, num_attention_heads=4), seed=0).save_pretrained(wide)
    adapter = make_adapter(wide, tmp_path / "wide_adapter")
    model = build_model_from_config(tiny_config(tokenizer), seed=0)
    with pytest.raises(AdapterError, match=r"has shape \(\d+, \d+\), expected .*another size \(hidden 64 here\)"):
        check_adapter(model, adapter)


def test_adapter_for_more_layers(tmp_path, tokenizer):
    deep = tmp_path / "deep_base"
    build_model_from_config(dict(tiny_config(tokenizer), num_hidden_layers=3), seed=0).save_pretrained(deep)
    adapter = make_adapter(deep, tmp_path / "deep_adapter")
    model = build_model_from_config(tiny_config(tokenizer), seed=0)
    with pytest.raises(AdapterError, match="is for layer 2, the base model has 2 layers"):
        check_adapter(model, adapter)


def test_adapter_for_another_architecture(tmp_path, tokenizer):
    """A Phi adapter (fc1/fc2/dense targets) on a LLaMA base."""
    phi = tmp_path / "phi_base"
    build_model_from_config(dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, vocab_size=len(tokenizer)), seed=0).save_pretrained(phi)
    adapter = make_adapter(phi, tmp_path / "phi_adapter", target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"])
    model = build_model_from_config(tiny_config(tokenizer), seed=0)
    with pytest.raises(AdapterError, match="target module 'dense' does not exist in the base model .*'llama'"):
        check_adapter(model, adapter)


def test_adapter_error_surfaces_through_the_loader(base_dir, tmp_path, tokenizer):
    deep = tmp_path / "deep_base"
    build_model_from_config(dict(tiny_config(tokenizer), num_hidden_layers=3), seed=0).save_pretrained(deep)
    adapter = make_adapter(deep, tmp_path / "deep_adapter", peft_type="LORA")
    with pytest.raises(AdapterError, match="layer 2"):
        load_for_inference(base_dir, adapter=adapter, dtype="float32", device="cpu")


# -------------------------------------------------------------------- reference-format adapters
def test_reference_format_adapter_scores_like_reference_mixlora(base_dir, tokenizer, tmp_path):
    """An adapter directory as the reference writes it (adapter_model.bin only, its minimal config)
    loads here, and the evaluation logits equal those of the reference ``mixlora`` 0.2.3 package."""
    from tests.reference_oracle import attach_reference_adapter

    from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter

    model = load_base_model(base_dir, dtype="float32", device="cpu")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2))
    randomize_adapter(model, seed=11)
    full = tmp_path / "ours"
    save_mixlora_adapter(model, full)
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    shutil.copy(full / "adapter_model.bin", ref_dir)
    ref_cfg = {"bias": "none", "peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
               "routing_strategy": "mixlora", "num_experts": 4, "act_fn": "silu", "top_k": 2,
               "base_model_name_or_path": str(base_dir), "task_type": "QUESTION_ANS"}
    (ref_dir / "adapter_config.json").write_text(json.dumps(ref_cfg))

    ours, _ = load_for_inference(base_dir, adapter=ref_dir, dtype="float32", device="cpu")
    theirs = attach_reference_adapter(load_base_model(base_dir, dtype="float32", device="cpu"), ref_dir)

    prompts = ["Please choose the correct answer to the question: which? (A) red (B) blue\nAnswer:", "is it\nAnswer:"]
    batch = pad_batch([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, "right")
    with torch.inference_mode():
        torch.testing.assert_close(last_token_logits(ours, batch), last_token_logits(theirs, batch), atol=1e-5, rtol=1e-5)


def test_bf16_base_with_fp32_adapter_scores_and_generates(base_dir, tokenizer, tmp_path):
    """The GPU configuration (bf16 base, fp32 adapter), run on the CPU: close to fp32 throughout.

    The adapter has trained-like magnitudes: the large random ones of the other tests amplify bf16
    rounding (and flip routing decisions) so much that the comparison would say little.
    """
    from mixlora_ds.inference import generate

    adapter = make_adapter(base_dir, tmp_path / "small", std=0.05)
    fp32, _ = load_for_inference(base_dir, adapter=adapter, dtype="float32", device="cpu")
    bf16, _ = load_for_inference(base_dir, adapter=adapter, dtype="bfloat16", device="cpu")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].mlp.router.weight.dtype == torch.float32
    prompts = ["Please choose the correct answer to the question: which? (A) red (B) blue\nAnswer:", "is it\nAnswer:"]
    batch = pad_batch([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, "left")
    with torch.inference_mode():
        got, want = last_token_logits(bf16, batch), last_token_logits(fp32, batch)
    assert got.dtype == torch.float32
    # bf16 rounding only (the base alone is at ~0.5%); a wrong dtype path would be far off.
    assert float((got - want).norm() / want.norm()) < 0.03
    assert len(generate(bf16, tokenizer, prompts, max_new_tokens=4)) == 2


def test_adapter_saved_by_peft_loads_with_peft_logits(base_dir, tokenizer, tmp_path):
    """A DoRA adapter written by HF PEFT itself (its full config, its key names) gives PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base_model(base_dir, dtype="float32", device="cpu"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapter(model, std=0.1)
    model.save_pretrained(tmp_path / "peft")
    model.eval()
    ours, _ = load_for_inference(base_dir, adapter=tmp_path / "peft", dtype="float32", device="cpu")
    ids = torch.tensor([encode_prompt(tokenizer, "which stone is warm\nAnswer:")])
    with torch.inference_mode():
        torch.testing.assert_close(ours(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
