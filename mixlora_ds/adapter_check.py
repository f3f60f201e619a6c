"""Check an adapter directory against a base model before anything is injected.

A missing file, a file that does not parse, or an adapter (MixLoRA, LoRA or DoRA; reference-format
files included) made for another architecture or model size fails here, with a message that says
which file, key or shape is wrong, instead of somewhere inside injection or loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mixlora_ds.adapter_io import (
    CONFIG_NAME,
    AdapterError,
    TensorKey,
    adapter_weights_file,
    parse_tensor_key,
    read_adapter_config,
    read_adapter_weights,
)
from mixlora_ds.config import MixLoraConfig


@dataclass(frozen=True)
class _Base:
    """What of the base model an adapter must fit."""

    layers: nn.ModuleList
    model_type: str
    hidden: int

    @classmethod
    def of(cls, model: nn.Module) -> "_Base":
        config = model.config
        return cls(model.get_decoder().layers, getattr(config, "model_type", "?"), int(config.hidden_size))


def check_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> MixLoraConfig:
    """Validate ``adapter_dir`` against ``model`` before anything is injected; returns its config.

    Checks the files exist and parse, every target projection exists in the model, and every saved
    tensor fits the module it belongs to (layer index, in/out features, rank, router width).
    """
    adapter_dir = Path(adapter_dir)
    config, weights_file, weights = _read_adapter(adapter_dir)
    base = _Base.of(model)
    _check_targets(base, config, adapter_dir / CONFIG_NAME)
    checked = 0
    for key, tensor in weights.items():
        t = parse_tensor_key(key)
        if t is None or t.kind == "lora_magnitude_vector":
            continue  # DoRA magnitudes, unknown keys: loading checks them against the injected model
        if t.layer >= len(base.layers):
            raise AdapterError(f"{weights_file}: key {key!r} is for layer {t.layer}, the base model has "
                               f"{len(base.layers)} layers")
        if t.kind == "router":
            _check_router(base, config, key, tensor, weights_file)
        else:
            _check_lora(base, config, key, t, tensor, weights_file)
        checked += 1
    if checked == 0:
        raise AdapterError(f"{weights_file}: no LoRA or router tensors found (keys start {list(weights)[:3]})")
    return config


def _read_adapter(adapter_dir: Path) -> tuple[MixLoraConfig, str, dict[str, torch.Tensor]]:
    """(config, weights file, tensors) of an adapter directory; every reason it cannot be read is an
    AdapterError naming the file."""
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: adapter directory not found")
    config = read_adapter_config(adapter_dir)
    weights_file = adapter_weights_file(adapter_dir)
    try:
        weights = read_adapter_weights(adapter_dir)
    except Exception as e:  # a truncated or foreign file
        raise AdapterError(f"{weights_file}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    if not weights:
        raise AdapterError(f"{weights_file}: holds no tensors")
    return config, str(weights_file), weights


def _check_targets(base: _Base, config: MixLoraConfig, config_path: Path) -> None:
    for target in config.target_modules:
        if not any(hasattr(getattr(layer, blk, None), target) for layer in base.layers for blk in ("self_attn", "mlp")):
            raise AdapterError(
                f"{config_path}: target module {target!r} does not exist in the base model "
                f"(model_type {base.model_type!r}); the adapter was made for another architecture"
            )


def _check_router(base: _Base, config: MixLoraConfig, key: str, tensor: torch.Tensor, where: str) -> None:
    """A router is [num_experts, hidden]."""
    if tensor.ndim != 2 or tensor.shape[1] != base.hidden:
        raise AdapterError(
            f"{where}: router {key!r} has shape {tuple(tensor.shape)}, expected [num_experts, {base.hidden}] "
            f"for this base model (hidden size {base.hidden})"
        )
    if config.is_mixlora and tensor.shape[0] != config.num_experts:
        raise AdapterError(f"{where}: router {key!r} has {tensor.shape[0]} experts, config says {config.num_experts}")


def _check_lora(base: _Base, config: MixLoraConfig, key: str, t: TensorKey, tensor: torch.Tensor, where: str) -> None:
    """A LoRA A is [r, in], a B is [out, r], for the projection it adapts (experts at their own rank)."""
    module = getattr(getattr(base.layers[t.layer], t.block), t.proj, None)
    shape = _linear_shape(module) if module is not None else None
    if shape is None:
        raise AdapterError(
            f"{where}: key {key!r} names {t.block}.{t.proj}, which the base model "
            f"(model_type {base.model_type!r}) does not have; the adapter was made for another architecture"
        )
    out_f, in_f = shape
    r = config.expert_settings().r if t.expert is not None else config.r
    expected = (r, in_f) if t.kind == "lora_A" else (out_f, r)
    if tuple(tensor.shape) != expected:
        raise AdapterError(
            f"{where}: {key!r} has shape {tuple(tensor.shape)}, expected {list(expected)} for "
            f"layers.{t.layer}.{t.block}.{t.proj} ({in_f} -> {out_f}) at rank {r}; the adapter was "
            f"trained on a base model of another size (hidden {base.hidden} here)"
        )


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear-like module, also when ZeRO-3 has partitioned its weight."""
    w = getattr(module, "weight", None)
    if w is None:
        base = getattr(module, "base_layer", None)  # an already-wrapped projection
        return _linear_shape(base) if base is not None else None
    shape = tuple(getattr(w, "ds_shape", w.shape))
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None
