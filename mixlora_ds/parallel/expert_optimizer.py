"""Gradients, clipping, optimizer step and optimizer state of the experts a rank owns under expert
parallelism, beside DeepSpeed's engine.

Why not DeepSpeed's engine for them: its ZeRO-1/2 optimizer handles expert parameters (reduction
over the expert-data-parallel group, partitioning per expert group) only when the model holds
DeepSpeed's own MoE layer classes, which it looks for to switch that on; its stage 3 refuses MoE.
MixLoRA's experts are LoRA stacks inside the project's own block. So the engine optimizes what is
replicated (router, attention LoRA), exactly as without EP, and this class, for the parameters
tagged as experts (``model.experts.is_expert_param``):

- keeps them in fp32 (the engine casts the parameters it manages to bf16 and keeps fp32 masters;
  expert compute casts these at use, giving the same bf16 values),
- sums their gradients over the EDP group and divides by the world size: each expert's gradient
  already sums the tokens of its whole EP group, so this is the same average DeepSpeed takes,
- adds their squared norm, summed once over the EP group (each expert counted once), to the norm
  the engine computes, so gradient clipping sees every parameter exactly once, and clips them with
  the engine's factor,
- steps torch's AdamW (what the engine runs for ``optim.impl: torch``) with the engine's learning
  rate, skipping the steps the engine skips.
Optimizer state is not partitioned further: EP already splits it E/P ways.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as tdist

from mixlora_ds.parallel.expert_parallel import ExpertParallel


class ExpertOptimizer:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], ep: ExpertParallel, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, max_grad_norm: float):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.ep = ep
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._sq_norm: torch.Tensor | None = None
        self._total_norm: torch.Tensor | None = None
        self._engine_optimizer = None

    # ------------------------------------------------------------------------------ engine link
    def attach(self, engine) -> None:
        """Make the engine's gradient norm (and so its clipping) include the experts."""
        zero = engine.optimizer
        if not hasattr(zero, "scaled_global_norm"):
            raise RuntimeError("expert parallelism needs DeepSpeed's ZeRO stage 1 or 2 optimizer for the replicated "
                               f"adapter, got {type(zero).__name__}")
        own_norm = zero.scaled_global_norm

        def norm_with_experts(norm_type: int = 2) -> torch.Tensor:
            norm = own_norm(norm_type)
            self._total_norm = None
            if self._sq_norm is None or not torch.isfinite(norm) or norm < 0:
                return norm  # DeepSpeed's own sentinel for a non-finite norm stays as it is
            total = torch.sqrt(norm.double() ** 2 + self._sq_norm.to(norm.device)).to(norm.dtype)
            if not torch.isfinite(total):
                total = torch.full_like(norm, -1.0)  # DeepSpeed's marker for inf/NaN gradients
            self._total_norm = total
            return total

        zero.scaled_global_norm = norm_with_experts
        self._engine_optimizer = zero

    # --------------------------------------------------------------------------------- the step
    def reduce_gradients(self) -> None:
        """At the accumulation boundary, before the engine's step: average and measure the gradients."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        if tdist.get_world_size(self.ep.edp_group) > 1:
            tdist.all_reduce(flat, group=self.ep.edp_group)
        flat.div_(self.ep.layout.world_size)
        sq = flat.double().pow(2).sum().reshape(1)
        tdist.all_reduce(sq, group=self.ep.ep_group)
        self._sq_norm = sq[0]
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def step(self, lr: float) -> None:
        """After the engine's step: the same learning rate, clip factor and skip decision."""
        skipped = bool(getattr(self._engine_optimizer, "overflow", False))
        if not skipped:
            if self.max_grad_norm > 0 and self._total_norm is not None:
                # DeepSpeed's clip factor (stage_1_and_2.unscale_and_clip_grads), loss scale 1.
                clip = max(1.0, (float(self._total_norm) + 1e-6) / self.max_grad_norm)
                for p in self.params:
                    p.grad.div_(clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sq_norm = self._total_norm = None

    # ---------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """This rank's experts: values and AdamW state per parameter name, with the experts' place."""
        state = {}
        for name, p in zip(self.names, self.params):
            s = self.optimizer.state.get(p, {})
            state[name] = {"param": p.detach().cpu().clone(),
                           **{k: v.detach().cpu().clone() for k, v in s.items() if k != "step"}}
            if "step" in s:
                state[name]["step"] = float(s["step"])
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``state`` as ``state_dict`` returns it, already cut to this rank's experts."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"expert state has no entry for {missing[:3]}")
        for name, p in zip(self.names, self.params):
            entry = state[name]
            if entry["param"].shape != p.shape:
                raise ValueError(f"{name}: saved experts of shape {tuple(entry['param'].shape)}, this rank holds "
                                 f"{tuple(p.shape)}")
            p.copy_(entry["param"])
            moments = {k: entry[k].to(p.device) for k in ("exp_avg", "exp_avg_sq") if k in entry}
            if moments:
                self.optimizer.state[p] = {"step": torch.tensor(entry["step"]), **moments}


@contextlib.contextmanager
def kept_from_engine(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside this block DeepSpeed's engine start-up neither broadcasts ``params`` from rank 0 (each
    rank owns other experts) nor leaves them cast to its dtype (they stay fp32 masters)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    kept = [p.data for p in params]
    for p in params:
        p.ds_status = ZeroParamStatus.NOT_AVAILABLE  # what the engine's broadcast skips
    try:
        yield
    finally:
        for p, data in zip(params, kept):
            del p.ds_status
            p.data = data
