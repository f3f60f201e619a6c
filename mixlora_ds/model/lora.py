"""LoRA on one frozen linear layer (attention projections and the plain-LoRA baseline)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mixlora_ds.config import LoraSettings
from mixlora_ds.model import dora


def init_lora_A_(weight: torch.Tensor, settings: LoraSettings) -> None:
    """Initialise LoRA A matrices; ``weight`` is [..., r, in] (a stack of experts allowed)."""
    with torch.no_grad():
        if settings.init == "gaussian":
            weight.normal_(0.0, 1.0 / settings.r)
        else:  # kaiming_uniform(a=sqrt(5)) of an [r, in] matrix is U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(weight.shape[-1])
            weight.uniform_(-bound, bound)


def weight_version(t: torch.Tensor) -> int:
    """In-place update counter of ``t`` (tensors made under inference_mode keep none: -1)."""
    return -1 if t.is_inference() else t._version


def cached_for_inference(module: nn.Module, weights: tuple[torch.Tensor, ...], dtype: torch.dtype, build):
    """``build()`` (weights prepared for use: cast, stacked, scaled), cached on ``module`` while the
    weights are frozen and autograd is off, so decoding does not redo it for every token.

    Trainable weights are never cached: optimizers (DeepSpeed's too) may update them through
    ``.data``, which no version counter sees. Under torch.compile the graph hoists the work itself.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or any(w.requires_grad for w in weights):
        return build()
    key = (dtype, *(weight_version(w) for w in weights), *(w.data_ptr() for w in weights))
    cache = getattr(module, "_inference_cache", None)
    if cache is None or cache[0] != key:
        module._inference_cache = cache = (key, build())
    return cache[1]


class LoraLinear(nn.Module):
    """``y = W x + b + s * B A dropout(x)``; with DoRA, ``y = m / ||W + sBA||_row * (W x + s B A dropout(x)) + b``.

    The base layer stays a child module (``base_layer``) so ZeRO-3 partitions and gathers it as usual.
    DoRA's rescaling is ``dora.py``'s, which the expert LoRAs share.
    """

    def __init__(self, base_layer: nn.Linear, settings: LoraSettings, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.settings = settings
        self.scaling = settings.scaling
        in_f, out_f = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        self.lora_A = nn.Linear(in_f, settings.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(settings.r, out_f, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(settings.lora_dropout) if settings.lora_dropout > 0 else nn.Identity()
        init_lora_A_(self.lora_A.weight, settings)
        nn.init.zeros_(self.lora_B.weight)
        if settings.use_dora:
            magnitude = dora.initial_magnitude(base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
            self.lora_magnitude_vector = nn.Parameter(magnitude.to(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        # In the activation dtype: casting the small weights is cheaper than casting activations.
        A, B = self._weights(x.dtype)
        return (self.lora_dropout(x) @ A) @ B

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A^T and s*B^T in ``dtype`` (cached for a frozen adapter, see ``cached_for_inference``)."""
        A, B = self.lora_A.weight, self.lora_B.weight
        return cached_for_inference(self, (A, B), dtype, lambda: (A.to(dtype).t(), (B.to(dtype) * self.scaling).t()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude_vector is None:
            return self.base_layer(x) + self.lora_delta(x)
        base = self.base_layer(x)
        # W is whole here, as in every forward (``partitioned.py``).
        norm = dora.weight_norm(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
        return dora.rescaled_output(base, self.lora_delta(x), self.lora_magnitude_vector, norm, self.base_layer.bias,
                                    x.dtype)
