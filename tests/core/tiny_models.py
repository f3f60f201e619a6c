"""Tiny random-initialised models of every supported family (hidden 64, 2 layers unless told, fp32)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "phi")
VOCAB = 128
_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
    max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_EXTRA = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "gemma": dict(num_key_value_heads=2, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, head_dim=16),
    "phi3": dict(num_key_value_heads=2),
    "phi": dict(num_key_value_heads=4),
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **_COMMON | _EXTRA[model_type] | overrides)


def tiny_model(model_type: str, seed: int = 0, state_dict=None, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def randomize_adapter(model, std: float = 0.2, seed: int = 1) -> None:
    """Give every trainable tensor random values (B = 0 at init would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.ndim == 1 else 0.0))


def targets_for(model_type: str) -> list[str]:
    from mixlora_ds.model.families import family_for

    return list(family_for(model_type).all_projections)
