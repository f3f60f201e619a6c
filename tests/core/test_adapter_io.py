"""Adapter files: both weight formats, DoRA magnitudes, legacy keys, clear errors, atomic writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mixlora_ds import MixLoraConfig, inject_mixlora, load_mixlora_adapter, save_mixlora_adapter
from mixlora_ds.adapter_io import AdapterError, write_adapter
from tests.core.tiny_models import VOCAB, randomize_adapter, targets_for, tiny_model


def _trained(model_type="llama", **overrides):
    base = tiny_model(model_type)
    model = tiny_model(model_type, state_dict=base.state_dict())
    kwargs = dict(r=4, lora_alpha=8, num_experts=4, target_modules=targets_for(model_type))
    kwargs.update(overrides)
    inject_mixlora(model, MixLoraConfig(**kwargs))
    randomize_adapter(model)
    return base, model.eval()


def test_bin_and_safetensors_hold_the_reference_keys(tmp_path):
    _, model = _trained()
    save_mixlora_adapter(model, tmp_path)
    binary = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    st = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert binary.keys() == st.keys()
    assert len(binary) == 2 * (1 + 4 * 2 + 3 * 4 * 2)  # router + 4 attn LoRAs + 3 projections x 4 experts
    assert binary["mixlora.layers.1.mlp.moe_gate.weight"].shape == (4, 64)
    assert binary["mixlora.layers.0.mlp.down_proj.experts.3.lora_A.weight"].shape == (4, 128)
    assert binary["mixlora.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert all(t.dtype == torch.float32 for t in binary.values())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MIXLORA" and cfg["act_fn"] == "silu" and cfg["router_aux_loss_coef"] == 0.001


def test_mixdora_magnitudes_round_trip(tmp_path):
    base, model = _trained(use_dora=True)
    save_mixlora_adapter(model, tmp_path)
    keys = torch.load(tmp_path / "adapter_model.bin", weights_only=True).keys()
    assert "mixlora.layers.0.mlp.gate_proj.experts.2.lora_magnitude_vector" in keys
    assert "mixlora.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    reloaded = load_mixlora_adapter(tiny_model("llama", state_dict=base.state_dict()), tmp_path).eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max().item() <= 1e-6


def test_legacy_key_layout_loads(tmp_path):
    base, model = _trained()
    save_mixlora_adapter(model, tmp_path / "new")
    weights = torch.load(tmp_path / "new" / "adapter_model.bin", weights_only=True)
    legacy_names = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "w3_proj"}
    legacy = {}
    for key, t in weights.items():
        parts = key.split(".")
        if parts[3] == "mlp" and parts[4] == "moe_gate":
            key = f"mixlora.layers.{parts[2]}.gate.weight"
        elif parts[3] == "mlp":
            key = f"mixlora.layers.{parts[2]}.experts.{parts[6]}.{legacy_names[parts[4]]}.{parts[7]}.weight"
        legacy[key] = t
    (tmp_path / "old").mkdir()
    cfg = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    cfg["routing_strategy"] = "mixtral"
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(legacy, tmp_path / "old" / "adapter_model.bin")
    reloaded = load_mixlora_adapter(tiny_model("llama", state_dict=base.state_dict()), tmp_path / "old").eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max().item() <= 1e-6


def test_clear_errors(tmp_path):
    _, model = _trained()
    save_mixlora_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="adapter config not found"):
        load_mixlora_adapter(tiny_model("llama"), tmp_path / "missing")
    (tmp_path / "a" / "adapter_model.bin").unlink()
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors or adapter_model.bin"):
        load_mixlora_adapter(tiny_model("llama"), tmp_path / "a")
    # an adapter for another hidden size
    from tests.core.tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    save_mixlora_adapter(model, tmp_path / "b")
    wide = tiny_config("llama")
    wide.hidden_size, wide.head_dim = 96, 24
    with pytest.raises(AdapterError, match="shape"):
        load_mixlora_adapter(AutoModelForCausalLM.from_config(wide), tmp_path / "b")
    # an adapter for another architecture (phi3 projection names on a llama model)
    _, phi3 = _trained("phi3")
    save_mixlora_adapter(phi3, tmp_path / "c")
    with pytest.raises(Exception, match="target_modules"):
        load_mixlora_adapter(tiny_model("llama"), tmp_path / "c")


def test_failed_write_leaves_earlier_adapter_intact(tmp_path):
    _, model = _trained()
    save_mixlora_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = {"x": torch.zeros(2), "y": "not a tensor"}
    with pytest.raises(Exception):
        write_adapter(tmp_path, model.mixlora_config, bad)
    with pytest.raises(AdapterError, match="no tensors"):
        write_adapter(tmp_path, model.mixlora_config, {})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
