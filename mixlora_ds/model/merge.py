"""Put a loaded adapter into its fastest inference form.

- A plain LoRA / DoRA layer (``LoraLinear``) becomes its base ``nn.Linear`` again with
  ``W' = W + s B A`` (DoRA: ``W' = m / ||W + s B A||_row * (W + s B A)``), computed in fp32 (or wider) and
  rounded once to the base dtype. Those projections then cost exactly what the base model's do, which is
  what a batch-1 decode step is made of.
- MixLoRA's expert LoRAs cannot be merged (each token picks its own experts); each block switches to
  its fused inference form instead (``fused_ffn.py``): frozen and expert weights concatenated so a
  decode step runs five GEMMs per block where the base model runs three.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mixlora_ds.model.dora import adapted_weight, rescaled_weight
from mixlora_ds.model.lora import LoraLinear
from mixlora_ds.model.moe import moe_blocks
from mixlora_ds.model.partitioned import is_partitioned


@torch.no_grad()
def merged_weight(layer: LoraLinear) -> torch.Tensor:
    """The single weight matrix equivalent to ``layer`` in eval mode, in the base weight's dtype."""
    base = layer.base_layer.weight
    wide = torch.promote_types(base.dtype, torch.float32)  # at least fp32, float64 kept
    w = adapted_weight(base, layer.lora_A.weight.to(wide), layer.lora_B.weight.to(wide), layer.scaling)
    if layer.lora_magnitude_vector is not None:
        w = rescaled_weight(w, layer.lora_magnitude_vector)
    return w.to(base.dtype)


def merge_lora_layers(model: nn.Module) -> int:
    """Replace every ``LoraLinear`` of ``model`` by its base layer carrying the merged weight, in place;
    returns how many were merged."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, LoraLinear)]
    for parent, name, layer in targets:
        base = layer.base_layer
        base.weight.data = merged_weight(layer)
        setattr(parent, name, base)
    return len(targets)


def prepare_for_inference(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge LoRA layers and fuse the MixLoRA blocks for activations of ``dtype`` (default: the model's).

    The model is inference-only afterwards: its parameters are frozen, and saving it as an adapter
    is refused (``model.mixlora_merged``).
    """
    if any(is_partitioned(p) for p in model.parameters()):
        raise ValueError("cannot prepare a ZeRO-3 partitioned model for inference; export the adapter and load it")
    dtype = dtype or next(model.parameters()).dtype
    model.requires_grad_(False)
    merge_lora_layers(model)
    for block in moe_blocks(model):
        block.fuse_for_inference(dtype)
    model.mixlora_merged = True
    return model.eval()
