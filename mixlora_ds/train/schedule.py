"""Learning-rate schedule: linear warmup, then constant, cosine or linear decay.

A plain ``LambdaLR`` handed to DeepSpeed as the client scheduler, so its step count is saved in
and restored from DeepSpeed checkpoints with the optimizer.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def lr_factor(kind: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based: the lr used by update s+1)."""
    if kind not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown schedule type {kind!r}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * shape

    return factor


def warmup_steps_for(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    return warmup_steps if warmup_steps > 0 else int(math.ceil(warmup_ratio * total_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(kind, warmup_steps, total_steps, min_ratio))
