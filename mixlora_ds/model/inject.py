"""Attach MixLoRA (or a plain LoRA/DoRA baseline) to a Hugging Face causal LM, in place.

Only module names and shapes are read: under ZeRO-3 the base weights are empty placeholders.
(DoRA is the one exception: its magnitudes start at the base weights' row norms, which are
gathered for that purpose.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mixlora_ds.config import ConfigError, MixLoraConfig
from mixlora_ds.model.families import FamilySpec, activation_name, family_for
from mixlora_ds.model.lora import LoraLinear
from mixlora_ds.model.moe import MixLoraMoeBlock


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` for every supported family (also through wrappers that expose it)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: not a supported causal LM")
    return layers


def check_targets(config: MixLoraConfig, family: FamilySpec, model_type: str) -> None:
    unknown = [t for t in config.target_modules if t not in family.all_projections]
    if unknown:
        raise ConfigError(
            f"adapter config field 'target_modules': {unknown} not found in {model_type} models; "
            f"available: {list(family.all_projections)}"
        )


def inject_mixlora(model: nn.Module, config: MixLoraConfig, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Freeze ``model`` and add the adapter described by ``config``; returns ``model``.

    MIXLORA: plain LoRA on the targeted attention projections and a ``MixLoraMoeBlock`` in place of
    every feed-forward module. LORA: plain LoRA (or DoRA) on every targeted projection.
    Only router and LoRA parameters require gradients afterwards.
    """
    if getattr(model, "mixlora_config", None) is not None:
        raise ValueError("this model already carries a MixLoRA adapter")
    model_type = model.config.model_type
    family = family_for(model_type)
    check_targets(config, family, model_type)
    if config.act_fn is None:
        config.act_fn = activation_name(model.config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model.config, "_name_or_path", None) or None

    for p in model.parameters():
        p.requires_grad_(False)
    attention_settings = config.attention_settings()
    for layer in decoder_layers(model):
        for name in family.attention_projections:
            if name in config.target_modules:
                setattr(layer.self_attn, name, LoraLinear(getattr(layer.self_attn, name), attention_settings, adapter_dtype))
        if config.is_mixlora:
            layer.mlp = MixLoraMoeBlock(layer.mlp, family, config, model.config.hidden_size, config.act_fn, adapter_dtype)
        else:
            for name in family.ffn_projections:
                if name in config.target_modules:
                    setattr(layer.mlp, name, LoraLinear(getattr(layer.mlp, name), attention_settings, adapter_dtype))
    model.mixlora_config = config
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
