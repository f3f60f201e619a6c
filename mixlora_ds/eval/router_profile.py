"""Expert-load profile of an evaluation run (the paper's Figure 5), computed exactly.

For every MixLoRA layer it counts, over the real (non-padding) tokens of every batch, how many routed
(token, slot) assignments each expert received. Counts add up across batches and across ranks, so
the result does not depend on batch size, padding, order or the number of ranks.

Reported per layer l and expert e:
- ``share[l][e]``: count / all assignments of the layer (rows sum to 1; a balanced router gives 1/E);
- ``token_fraction[l][e]``: count / real tokens (rows sum to top_k for top-k routing), the unit of
  the reference's printed "load";
- ``share_std[l]``: the population standard deviation of ``share[l]`` over the experts, and its mean
  over layers (``share_std_mean``); also the std of the layer-averaged shares (``mean_share_std``).

The reference profiler (MoE-PEFT ``_profiling`` / evaluator) instead keeps a running ``(old + new) / 2``
per batch, which weights the last batch by 1/2 and the first by 1/2^n, counts padding tokens, and
divides the sum over layers by a hard-coded 32 (right only for 32-layer models); its numbers are
not comparable with these (``reference-mixlora.md`` §9 item 14).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class ExpertLoadProfiler:
    def __init__(self, model: nn.Module | None):
        """``model=None`` (or a model without MixLoRA blocks) gives a profiler that records nothing."""
        from mixlora_ds.model.moe import moe_blocks

        self.num_layers = len(moe_blocks(model)) if model is not None else 0
        self.counts_LE: torch.Tensor | None = None
        self.entropy_sum_L: torch.Tensor | None = None
        self.tokens = 0.0

    @property
    def enabled(self) -> bool:
        return self.num_layers > 0

    @torch.no_grad()
    def observe(self, model: nn.Module, attention_mask_BS: torch.Tensor) -> None:
        """Add the routing of the model's last forward (``attention_mask_BS``: 1 = real token)."""
        if not self.enabled:
            return
        from mixlora_ds.model.stats import routing_statistics

        stats = routing_statistics(model, attention_mask_BS)
        counts_LE = stats.counts_LE.detach().double().cpu()
        tokens = float(stats.tokens)
        entropy_sum_L = stats.entropy_L.detach().double().cpu() * tokens
        if self.counts_LE is None:
            self.counts_LE, self.entropy_sum_L = counts_LE, entropy_sum_L
        else:
            self.counts_LE += counts_LE
            self.entropy_sum_L += entropy_sum_L
        self.tokens += tokens

    def all_reduce_(self) -> None:
        """Sum the counts of all ranks (a collective: every rank must call it, also with no batches)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not self.enabled:
            return
        E = self._num_experts_all_ranks()
        L = self.num_layers
        packed = torch.zeros(L * E + L + 1, dtype=torch.float64)
        if self.counts_LE is not None:
            packed[: L * E] = self.counts_LE.reshape(-1)
            packed[L * E : L * E + L] = self.entropy_sum_L
        packed[-1] = self.tokens
        # gloo and NCCL both reduce fp64; NCCL needs the tensor on the GPU.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        self.counts_LE = packed[: L * E].reshape(L, E)
        self.entropy_sum_L = packed[L * E : L * E + L]
        self.tokens = float(packed[-1])

    def _num_experts_all_ranks(self) -> int:
        """A rank that scored nothing has not seen the expert count; agree on it first."""
        import torch.distributed as dist

        box = [None if self.counts_LE is None else int(self.counts_LE.shape[1])]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, box[0])
        known = [g for g in gathered if g is not None]
        if not known:
            raise RuntimeError("no rank observed any routing")
        return known[0]

    def summary(self) -> dict[str, Any] | None:
        if not self.enabled or self.counts_LE is None or self.tokens == 0:
            return None
        counts_LE = self.counts_LE
        share_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)
        fraction_LE = counts_LE / self.tokens
        std_L = share_LE.std(dim=-1, unbiased=False)
        mean_share_E = share_LE.mean(0)
        return {
            "layers": int(counts_LE.shape[0]),
            "experts": int(counts_LE.shape[1]),
            "tokens": int(round(self.tokens)),
            "share": share_LE.tolist(),
            "token_fraction": fraction_LE.tolist(),
            "share_std": std_L.tolist(),
            "share_std_mean": float(std_L.mean()),
            "mean_share": mean_share_E.tolist(),
            "mean_share_std": float(mean_share_E.std(unbiased=False)),
            "router_entropy": (self.entropy_sum_L / self.tokens).tolist(),
            "counts": counts_LE.round().long().tolist(),
        }
