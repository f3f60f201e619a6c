"""The MixLoRA block that replaces a decoder layer's feed-forward module.

route -> dispatch -> expert compute -> combine; each stage lives in its own module (router.py,
dispatch.py, experts.py with pair_math.py, mixing.py and fused_ffn.py) and is tested on its own. The
dispatcher is handed in (``LocalDispatcher`` unless the trainer installs an expert-parallel one);
expert compute runs over the experts this block holds.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from mixlora_ds.config import MixLoraConfig
from mixlora_ds.model.dispatch import LocalDispatcher, RoutedTokens, TokenDispatcher
from mixlora_ds.model.experts import ExpertLoraStack, FFNShape, ffn_loop, folded_ffn
from mixlora_ds.model.experts_fused import fused_pair_math_for, fused_unsupported_reason
from mixlora_ds.model.families import FamilySpec
from mixlora_ds.model.fused_ffn import FusedExpertFFN, fuse_block_weights, unshare_base_weights
from mixlora_ds.model.pair_math import PAIR_MATH
from mixlora_ds.model.router import MixLoraRouter, Routing

COMPUTE_PATHS = ("auto", *PAIR_MATH, "fused", "loop")


class MixLoraMoeBlock(nn.Module):
    """Router + expert LoRAs around a frozen FFN (kept as the child ``base_mlp``).

    After each forward the block keeps its routing (``last_routing``) so the load-balance loss and
    routing statistics can be computed by the caller; nothing is kept at module level.
    """

    def __init__(self, base_mlp: nn.Module, family: FamilySpec, config: MixLoraConfig, hidden_size: int,
                 act_fn: str, dtype: torch.dtype = torch.float32, dispatcher: TokenDispatcher | None = None):
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
        self.dispatcher: TokenDispatcher = dispatcher or LocalDispatcher()
        self.num_local_experts = config.num_experts
        """Experts held here: all of them, or a slice under expert parallelism (``keep_experts``)."""
        self.act_fn = act_fn
        self._fused_fallbacks: set[str] = set()
        self.compute_path = "loop" if settings.use_dora else "auto"
        """"auto" (the default): "fused" on CUDA where it covers the block, else "dense" (the fastest
        measured on each; BENCHMARKS.md compares the paths). "dense": masked GEMMs over all experts;
        "grouped": pairs sorted by expert, one grouped matmul per projection (the folded paths of
        ``pair_math.PAIR_MATH``); "fused": the per-pair work as one custom op, low-rank GEMMs plus an
        element-wise pass each way in Triton (``experts_fused.py``; gated FFNs with a SiLU or tanh-GELU
        activation; falls back to "dense" with a warning elsewhere); "loop": the reference. DoRA
        experts need "loop": their per-expert output rescaling does not commute with the shared down
        projection."""
        self.recompute = True
        """Recompute per-pair intermediates in backward instead of storing them."""
        self.compiled: bool | None = None
        """Fuse the element-wise work of the dense path (and of the fused inference form) with
        torch.compile; None = on CUDA only."""
        self.ffn_dropout = nn.Dropout(config.ffn_dropout) if config.ffn_dropout > 0 else nn.Identity()
        self.last_routing: Routing | None = None
        self.fused_ffn: FusedExpertFFN | None = None
        """The inference form (``fuse_for_inference``); None while the experts may train."""

    def keep_experts(self, first: int, count: int) -> None:
        """Hold only experts ``first .. first+count-1`` (numbered 0 .. count-1 here); the router
        still scores all of them. For expert parallelism, which installs a matching dispatcher."""
        for stack in self.experts.values():
            stack.keep_experts(first, count)
        self.num_local_experts = count

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
        tokens, handle = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.expert_compute(tokens), handle)
        y_TD = self.ffn_dropout(y_TD)
        if routing.passthrough_T is not None:
            y_TD = torch.where(routing.passthrough_T.unsqueeze(-1), x_TD.to(y_TD.dtype), y_TD)
        return y_TD.view(*batch_shape, -1)

    def expert_compute(self, tokens: RoutedTokens) -> torch.Tensor:
        """Per row, the weighted sum of its experts' outputs, over the experts held here."""
        compiled = tokens.x_ND.is_cuda if self.compiled is None else self.compiled
        if self.fused_ffn is not None and tokens.x_ND.dtype == self.fused_ffn.dtype:
            return self.fused_ffn(tokens, self.num_local_experts, compiled=compiled)
        path = self.compute_path
        if path == "auto":
            covered = fused_unsupported_reason(self.ffn, self.experts, self.act_fn) is None
            path = "fused" if tokens.x_ND.is_cuda and covered else "dense"
        if path == "loop":
            return ffn_loop(self.ffn, self.experts, tokens, self.num_local_experts)
        if path == "fused" and self._fused_ok():
            # The custom op recomputes its per-pair intermediates in backward itself.
            return folded_ffn(self.ffn, self.experts, tokens, self.num_local_experts,
                              fused_pair_math_for(self.act_fn), recompute=False)
        path = "dense" if path == "fused" else path
        return folded_ffn(self.ffn, self.experts, tokens, self.num_local_experts, PAIR_MATH[path],
                          recompute=self.recompute, compiled=compiled and path == "dense")

    def _fused_ok(self) -> bool:
        """Whether the fused path can run this block; warns once per reason when not."""
        reason = fused_unsupported_reason(self.ffn, self.experts, self.act_fn)
        if reason is not None and reason not in self._fused_fallbacks:
            self._fused_fallbacks.add(reason)
            warnings.warn(f"MixLoRA compute path 'fused' falls back to 'dense': {reason}")
        return reason is None


def moe_blocks(model: nn.Module) -> list[MixLoraMoeBlock]:
    """The MixLoRA blocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MixLoraMoeBlock)]


def set_compute_path(model: nn.Module, path: str, compiled: bool | None = None) -> None:
    """Choose how every MixLoRA block computes its experts (see ``MixLoraMoeBlock.compute_path``);
    ``compiled`` (dense path only) fuses the per-pair element-wise work with torch.compile (None: on
    CUDA devices only, the default). Compiled, a second backward through a retained graph
    (``backward(retain_graph=True)`` twice) needs ``torch._functorch.config.donated_buffer = False``
    (PyTorch's donated buffers; seen on H200s), or ``compiled=False``."""
    if path not in COMPUTE_PATHS:
        raise ValueError(f"compute path must be one of {COMPUTE_PATHS}, got {path!r}")
    if compiled and path not in ("auto", "dense", "fused"):  # None and False are fine for any path
        raise ValueError("compiled=True applies to the 'dense' compute path (and 'auto' / 'fused' where they use it)")
    for block in moe_blocks(model):
        if path != "loop" and block.config.expert_settings().use_dora:
            raise ValueError("DoRA experts support only the 'loop' compute path")
        block.compute_path = path
        block.compiled = compiled
