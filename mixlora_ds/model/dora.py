"""DoRA, written once: the weight-decomposed rescaling of ``LoraLinear`` and of every expert LoRA.

DoRA splits the adapted weight ``W' = W + s B A`` into a direction and a trained magnitude ``m`` per
output row: ``y = m / ||W + s B A||_row * (W x + s B A dropout(x)) + b``. The row norms are a constant
to autograd (as in the DoRA paper and PEFT), so backward needs no gradient through ``W``; a bias
(Qwen2, Phi) stays outside the rescaling. ``m`` starts at the row norms, so a new adapter (B = 0)
computes what the base layer does.

Shapes: O output features, I input features, r LoRA rank, N rows.
"""

from __future__ import annotations

import torch

from mixlora_ds.model.partitioned import gathered


def adapted_weight(W_OI: torch.Tensor, A_rI: torch.Tensor, B_Or: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + s B A`` in the adapter's dtype (A's)."""
    return W_OI.to(A_rI.dtype) + scaling * (B_Or @ A_rI)


def weight_norm(W_OI: torch.Tensor, A_rI: torch.Tensor, B_Or: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of ``W + s B A`` (DoRA's denominator), ``[O]``."""
    return torch.linalg.vector_norm(adapted_weight(W_OI, A_rI, B_Or, scaling), dim=1)


@torch.no_grad()
def initial_magnitude(W_OI: torch.Tensor, A_rI: torch.Tensor, B_Or: torch.Tensor, scaling: float) -> torch.Tensor:
    """What ``m`` starts from. Computed at injection, outside any forward, where the base weight
    ``W_OI`` (the parameter itself) may still be partitioned: it is gathered here."""
    with gathered([W_OI]):
        return weight_norm(W_OI, A_rI, B_Or, scaling)


def rescaled_output(base_NO: torch.Tensor, delta_NO: torch.Tensor, magnitude_O: torch.Tensor, norm_O: torch.Tensor,
                    bias_O: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """DoRA's output in ``dtype``, from the base layer's ``W x + b`` (``base_NO``), the LoRA delta
    ``s B A dropout(x)`` and the row norms of ``weight_norm``."""
    scale_O = magnitude_O / norm_O.detach()
    if bias_O is None:
        return (scale_O * (base_NO + delta_NO)).to(dtype)
    b_O = bias_O.detach()
    return (scale_O * (base_NO - b_O + delta_NO) + b_O).to(dtype)


def rescaled_weight(adapted_OI: torch.Tensor, magnitude_O: torch.Tensor) -> torch.Tensor:
    """``m / ||W'||_row * W'``: the one weight a DoRA layer without dropout applies (``merge.py``)."""
    norm_O = torch.linalg.vector_norm(adapted_OI, dim=1)
    return adapted_OI * (magnitude_O.to(adapted_OI.dtype) / norm_O).unsqueeze(1)
