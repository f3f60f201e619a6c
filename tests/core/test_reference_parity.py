"""Logits equal the reference ``mixlora`` 0.2.3 package for the same adapter, in both directions."""

import json

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora, load_mixlora_adapter, save_mixlora_adapter
from tests.core.tiny_models import FAMILIES, VOCAB, randomize_adapter, targets_for, tiny_model
from tests.reference_oracle import attach_reference_adapter


def reference_model(model_type, state_dict, adapter_dir):
    return attach_reference_adapter(tiny_model(model_type, state_dict=state_dict), adapter_dir)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adapter_written_here_gives_reference_logits(model_type, tmp_path):
    base = tiny_model(model_type)
    ours = tiny_model(model_type, state_dict=base.state_dict())
    inject_mixlora(ours, MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2,
                                       target_modules=targets_for(model_type)))
    randomize_adapter(ours)
    ours.eval()
    save_mixlora_adapter(ours, tmp_path)
    ref = reference_model(model_type, base.state_dict(), tmp_path)
    ids = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5


def _reference_style_weights(model_type, num_experts, r, gen):
    """Tensors under the reference key names, built here without mixlora_ds (as MoE-PEFT writes them)."""
    from tests.core.tiny_models import tiny_config

    cfg = tiny_config(model_type)
    d, i = cfg.hidden_size, cfg.intermediate_size
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    shapes = {  # (in, out) per projection
        "llama": {"q_proj": (d, heads * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (heads * hd, d),
                  "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)},
    }["llama"]
    w = {}
    for layer in range(cfg.num_hidden_layers):
        w[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = torch.randn(num_experts, d, generator=gen) * 0.3
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            fi, fo = shapes[proj]
            w[f"mixlora.layers.{layer}.self_attn.{proj}.lora_A.weight"] = torch.randn(r, fi, generator=gen) * 0.2
            w[f"mixlora.layers.{layer}.self_attn.{proj}.lora_B.weight"] = torch.randn(fo, r, generator=gen) * 0.2
        for proj in ("gate_proj", "up_proj", "down_proj"):
            fi, fo = shapes[proj]
            for j in range(num_experts):
                p = f"mixlora.layers.{layer}.mlp.{proj}.experts.{j}"
                w[f"{p}.lora_A.weight"] = torch.randn(r, fi, generator=gen) * 0.2
                w[f"{p}.lora_B.weight"] = torch.randn(fo, r, generator=gen) * 0.2
    return w


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_reference_written_adapter_loads_here(model_type, tmp_path):
    gen = torch.Generator().manual_seed(3)
    weights = _reference_style_weights(model_type, num_experts=4, r=4, gen=gen)
    config = {  # what MoE-PEFT's export writes (reference §4.1)
        "bias": "none", "peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
        "routing_strategy": "mixlora", "num_experts": 4, "act_fn": "silu", "top_k": 2,
        "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM",
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.save(weights, tmp_path / "adapter_model.bin")
    base = tiny_model(model_type)
    ours = load_mixlora_adapter(tiny_model(model_type, state_dict=base.state_dict()), tmp_path).eval()
    ref = reference_model(model_type, base.state_dict(), tmp_path)
    ids = torch.randint(3, VOCAB, (2, 13), generator=gen)
    with torch.no_grad():
        out_ours, out_ref = ours(ids).logits, ref(ids).logits
    assert (out_ours - out_ref).abs().max().item() <= 1e-5
    # the adapter really changed the model (the test would pass vacuously otherwise)
    with torch.no_grad():
        assert (out_ours - base(ids).logits).abs().max().item() > 1e-2
