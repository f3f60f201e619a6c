"""Training statistics kept on the device between logging steps, and the FLOP estimate for MFU."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from mixlora_ds import dist


class Interval:
    """Local sums since the last logging step, kept on the device (no host sync per micro-batch)
    and reduced across ranks in one all-reduce per logging step."""

    def __init__(self, n_tasks: int, n_layers: int, n_experts: int, device: torch.device):
        self.n_tasks, self.n_layers, self.n_experts = n_tasks, n_layers, n_experts
        z = functools.partial(torch.zeros, dtype=torch.float64, device=device)
        self.steps: list[int] = []
        self.lr: list[float] = []
        self.ce: list[torch.Tensor] = []          # this rank's CE sum per step
        self.aux: list[torch.Tensor] = []         # this rank's aux-loss sum per step
        self.tokens: list[torch.Tensor] = []      # answer tokens of the global batch per step
        self.grad_norm: list[Any] = []
        self.real_tokens, self.positions = z(()), z(())
        self.task_ce, self.task_tokens = z(n_tasks), z(n_tasks)
        self.counts_LE, self.entropy_L, self.dropped_L = z(n_layers, n_experts), z(n_layers), z(n_layers)
        self.routed_tokens = z(())
        self.t0 = time.time()

    def local_sums(self) -> dict[str, torch.Tensor]:
        """This rank's statistics that ranks add up, by name (the per-step ones stacked)."""
        return {"ce": torch.stack(self.ce), "aux": torch.stack(self.aux), "real_tokens": self.real_tokens,
                "positions": self.positions, "task_ce": self.task_ce, "task_tokens": self.task_tokens,
                "counts_LE": self.counts_LE, "entropy_L": self.entropy_L, "routed_tokens": self.routed_tokens,
                "dropped_L": self.dropped_L}


def all_reduce_sums(parts: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each tensor summed over all ranks, in one all-reduce; back on the host by name, in its shape (a
    0-d tensor as a number)."""
    summed = dist.all_reduce_(torch.cat([t.reshape(-1) for t in parts.values()])).cpu().numpy()
    out, offset = {}, 0
    for name, t in parts.items():
        chunk = summed[offset:offset + t.numel()]
        out[name] = chunk.reshape(t.shape) if t.dim() else chunk[0]
        offset += t.numel()
    return out


def flop_per_token(model: torch.nn.Module, hf_config: Any, seq_len: int) -> float:
    """Model FLOPs per token of one training step (no recompute counted, as MFU conventionally is).

    Frozen matmuls cost 2 (forward) + 2 (input gradient) FLOPs per weight; trainable ones add
    2 for the weight gradient. The MoE block's shared FFN runs once per token and a token uses
    top_k of the E stacked expert LoRAs. Attention scores: 2*S*d forward per layer (the causal
    half of 4*S*d), x3 with backward. An estimate: packing shortens the real attention spans.
    """
    frozen = trainable = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight
            n = w.ds_numel if hasattr(w, "ds_numel") else w.numel()
            if w.requires_grad:
                trainable += n
            else:
                frozen += n
    cfg = getattr(model, "mixlora_config", None)
    share = 1.0  # of the stacked expert weights that one token uses
    if cfg is not None and cfg.is_mixlora:
        k = 1 if cfg.routing_strategy == "mixlora-switch" else cfg.top_k  # top-p: top_k as an estimate
        share = k / cfg.num_experts
    for name, p in model.named_parameters():
        if p.requires_grad:
            n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            if ".experts." in name:
                trainable += n * share
            elif name.endswith("router.weight"):
                trainable += n
    layers = getattr(hf_config, "num_hidden_layers", 0)
    hidden = getattr(hf_config, "hidden_size", 0)
    return 4.0 * frozen + 6.0 * trainable + 3.0 * 2.0 * layers * seq_len * hidden
