"""Grouped matrix product over rows sorted by expert, with its own backward.

``grouped_mm(x_PK, w_EKN, offs_E)`` multiplies the rows ``offs[e-1]:offs[e]`` of ``x`` by ``w[e]``: each
expert's LoRA runs as one matmul over its contiguous slice. It uses ``torch._grouped_mm`` where the
device, dtype and alignment allow (no host synchronisation: the offsets stay on the device) and a
plain loop over slices otherwise. The backward is written here because the built-in derivative of
``torch._grouped_mm`` rejects the CPU layouts.
"""

from __future__ import annotations

import torch

_UNSUPPORTED: set[tuple] = set()


def _aligned(*tensors: torch.Tensor) -> bool:
    # torch._grouped_mm needs every matrix row to start on a 16-byte boundary.
    return all(t.shape[-1] * t.element_size() % 16 == 0 and t.shape[-2] * t.element_size() % 16 == 0 for t in tensors)


def _loop_slices(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()  # host sync: only on the fallback path
    return list(zip([0] + ends[:-1], ends))


def _mm_rows(x_PK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    key = ("rows", x_PK.device.type, x_PK.dtype)
    if key not in _UNSUPPORTED and _aligned(x_PK, w_EKN):
        try:
            return torch._grouped_mm(x_PK, w_EKN, offs=offs_E)
        except RuntimeError:
            _UNSUPPORTED.add(key)
    out = x_PK.new_empty(x_PK.shape[0], w_EKN.shape[-1])
    for e, (s, t) in enumerate(_loop_slices(offs_E)):
        out[s:t] = x_PK[s:t] @ w_EKN[e]
    return out


def _mm_weight_grad(x_PK: torch.Tensor, dy_PN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-group x_e^T @ dy_e, stacked to [E, K, N] (zero for groups with no rows)."""
    key = ("weight", x_PK.device.type, x_PK.dtype)
    if key not in _UNSUPPORTED and _aligned(x_PK, dy_PN) and x_PK.shape[0] * x_PK.element_size() % 16 == 0:
        try:
            return torch._grouped_mm(x_PK.t(), dy_PN, offs=offs_E)
        except RuntimeError:
            _UNSUPPORTED.add(key)
    out = x_PK.new_zeros(offs_E.shape[0], x_PK.shape[1], dy_PN.shape[1])
    for e, (s, t) in enumerate(_loop_slices(offs_E)):
        out[e] = x_PK[s:t].t() @ dy_PN[s:t]
    return out


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_PK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_PK, w_EKN, offs_E)
        return _mm_rows(x_PK, w_EKN, offs_E)

    @staticmethod
    def backward(ctx, dy_PN: torch.Tensor):
        x_PK, w_EKN, offs_E = ctx.saved_tensors
        dy_PN = dy_PN.contiguous()
        dx = _mm_rows(dy_PN, w_EKN.transpose(1, 2), offs_E) if ctx.needs_input_grad[0] else None
        dw = _mm_weight_grad(x_PK, dy_PN, offs_E) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x_PK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` sorted by group; ``offs_E`` = int32 cumulative row counts (end offsets)."""
    return _GroupedMatmul.apply(x_PK, w_EKN, offs_E)
