"""The MixLoRA block that replaces a decoder layer's feed-forward module.

route -> dispatch -> expert compute -> combine; each stage lives in its own module
(router.py, dispatch.py, experts.py) and is tested on its own.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from mixlora_ds.config import MixLoraConfig
from mixlora_ds.model.dispatch import LocalDispatcher
from mixlora_ds.model.experts import ExpertLoraStack, FFNShape, ffn_dense, ffn_grouped, ffn_loop
from mixlora_ds.model.experts_fused import ffn_fused, fused_unsupported_reason
from mixlora_ds.model.families import FamilySpec
from mixlora_ds.model.fused_ffn import FusedExpertFFN, fuse_block_weights, unshare_base_weights
from mixlora_ds.model.router import MixLoraRouter, Routing

COMPUTE_PATHS = ("dense", "fused", "grouped", "loop")


class MixLoraMoeBlock(nn.Module):
    """Router + expert LoRAs around a frozen FFN (kept as the child ``base_mlp``).

    After each forward the block keeps its routing (``last_routing``) so the load-balance loss and
    routing statistics can be computed by the caller; nothing is kept at module level.
    """

    def __init__(self, base_mlp: nn.Module, family: FamilySpec, config: MixLoraConfig, hidden_size: int,
                 act_fn: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_mlp = base_mlp
        self.config = config
        device = next(base_mlp.parameters()).device
        self.router = MixLoraRouter(hidden_size, config, device=device)
        settings = config.expert_settings()
        self.experts = nn.ModuleDict()
        for name in family.ffn_projections:
            if name in config.target_modules:
                base = getattr(base_mlp, name)
                self.experts[name] = ExpertLoraStack(
                    config.num_experts, base.in_features, base.out_features, settings, device=device, dtype=dtype
                )
                if settings.use_dora:
                    self.experts[name].init_dora(base)
        self.ffn = FFNShape(base_mlp, family.ffn_input_projections, family.ffn_output_projection, family.gated,
                            ACT2FN[act_fn])
        self.dispatcher = LocalDispatcher()
        self.act_fn = act_fn
        self._fused_fallbacks: set[str] = set()
        self.compute_path = "loop" if settings.use_dora else "dense"
        """"dense" (default: masked GEMMs over all experts, the fastest measured, see BENCHMARKS.md),
        "fused" (Triton kernels for the per-pair work, ``experts_fused.py``: CUDA and a gated FFN with
        a SiLU or tanh-GELU activation; less than half the dense path's activation memory, not yet
        faster; falls back to "dense" where it cannot run),
        "grouped" (pairs sorted by expert, one grouped matmul per projection) or "loop" (the
        reference). DoRA experts need "loop": their per-expert output rescaling does not commute
        with the shared down projection."""
        self.recompute = True
        """Recompute per-pair intermediates in backward instead of storing them."""
        self.compiled: bool | None = None
        """Fuse the element-wise work of the dense path (and of the fused inference form) with
        torch.compile; None = on CUDA only."""
        self.ffn_dropout = nn.Dropout(config.ffn_dropout) if config.ffn_dropout > 0 else nn.Identity()
        self.last_routing: Routing | None = None
        self.fused_ffn: FusedExpertFFN | None = None
        """The inference form (``fuse_for_inference``); None while the experts may train."""

    def fuse_for_inference(self, dtype: torch.dtype) -> None:
        """Switch to the fused inference form for activations of ``dtype`` (see ``fused_ffn.py``),
        which the base projections then share their weights with; ``train()`` undoes it. Not for the
        loop path, the reference kept for DoRA experts and tests."""
        if self.compute_path != "loop" and self.fused_ffn is None:
            self.fused_ffn = fuse_block_weights(self.ffn, self.experts, dtype)

    def train(self, mode: bool = True):
        if mode and self.fused_ffn is not None:
            self.fused_ffn = None
            unshare_base_weights(self.ffn)
        return super().train(mode)

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_BSD.shape[:-1]
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        if self.training and self.config.jitter_noise > 0:
            # Out of place: the caller's tensor is left alone (the reference jitters in place).
            eps = self.config.jitter_noise
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        seq_len = batch_shape[-1] if len(batch_shape) > 1 else None
        routing = self.router(x_TD, seq_len=seq_len)
        self.last_routing = routing
        if self.fused_ffn is not None and x_TD.dtype == self.fused_ffn.dtype:
            y_TD = self.fused_ffn(x_TD, routing, compiled=x_TD.is_cuda if self.compiled is None else self.compiled)
        elif self.compute_path == "loop":
            y_TD = ffn_loop(self.ffn, self.experts, x_TD, routing)
        elif self.compute_path == "fused" and self._fused_ok(x_TD):
            y_TD = ffn_fused(self.ffn, self.experts, x_TD, routing, self.act_fn)
        elif self.compute_path in ("fused", "dense"):
            y_TD = ffn_dense(self.ffn, self.experts, x_TD, routing, recompute=self.recompute, compiled=self.compiled)
        else:
            y_TD = ffn_grouped(self.ffn, self.experts, x_TD, routing, self.dispatcher, recompute=self.recompute)
        y_TD = self.ffn_dropout(y_TD)
        if routing.passthrough_T is not None:
            y_TD = torch.where(routing.passthrough_T.unsqueeze(-1), x_TD.to(y_TD.dtype), y_TD)
        return y_TD.view(*batch_shape, -1)

    def _fused_ok(self, x_TD: torch.Tensor) -> bool:
        """Whether the fused kernels can run this block on ``x_TD``; warns once per reason when not."""
        reason = fused_unsupported_reason(self.ffn, self.experts, self.act_fn, x_TD)
        if reason is not None and reason not in self._fused_fallbacks:
            self._fused_fallbacks.add(reason)
            warnings.warn(f"MixLoRA compute path 'fused' falls back to 'dense': {reason}")
        return reason is None


def moe_blocks(model: nn.Module) -> list[MixLoraMoeBlock]:
    """The MixLoRA blocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MixLoraMoeBlock)]


def set_compute_path(model: nn.Module, path: str, compiled: bool | None = None) -> None:
    """Choose how every MixLoRA block computes its experts (see ``MixLoraMoeBlock.compute_path``);
    ``compiled`` (dense path only) fuses the
    per-pair element-wise work with torch.compile, worth ~5% of a 7B training step on an H100
    (None: on CUDA devices only, the default). Compiled, a second backward through a retained graph
    (``backward(retain_graph=True)`` twice) needs ``torch._functorch.config.donated_buffer = False``
    (PyTorch's donated buffers; seen on H200s), or ``compiled=False``."""
    if path not in COMPUTE_PATHS:
        raise ValueError(f"compute path must be one of {COMPUTE_PATHS}, got {path!r}")
    if compiled and path not in ("dense", "fused"):  # None and False are fine for any path
        raise ValueError("compiled=True applies to the 'dense' compute path (and 'fused' where it falls back to it)")
    for block in moe_blocks(model):
        if path != "loop" and block.config.expert_settings().use_dora:
            raise ValueError("DoRA experts support only the 'loop' compute path")
        block.compute_path = path
        block.compiled = compiled
