"""Build the frozen base model (sharded from the start under ZeRO-3) and attach the adapter.

Under ZeRO-3 the base is created inside ``deepspeed.zero.Init`` (through Transformers'
``HfDeepSpeedConfig``, which also makes ``from_pretrained`` load each rank's shard only), so no rank
ever holds the whole model. The adapter is then injected on the partitioned model: injection reads
module names and shapes, never weight values. With ``deepspeed.zero3_impl: mixlora_ds`` (the
default) the partitioned frozen weights are then re-sharded per decoder layer, one layer at a time
(``mixlora_ds.parallel``), and the engine runs stage 2 for the adapter; with ``deepspeed``,
DeepSpeed's stage-3 engine keeps them and partitions the adapter when the engine is created.
Everything it needs was derived, and checked, by the run plan (``plan.ModelPlan``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import mixlora_ds.parallel  # noqa: F401 - registers the sharded base's gatherer (model/partitioned.py)
from mixlora_ds.model.experts import is_expert_param
from mixlora_ds.train.compiled_layers import compile_layers, copy_gradients_out
from mixlora_ds.train.config import TrainConfig
from mixlora_ds.train.plan import ModelPlan

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class BuiltModel:
    model: nn.Module
    trainable: list[tuple[str, nn.Parameter]]
    hf_ds_config: Any = None
    """Keeps Transformers' weak global reference to the DeepSpeed config alive (DeepSpeed's ZeRO-3 only)."""
    sharded_base: Any = None
    """The ``ShardedFrozenBase`` when mixlora_ds shards the frozen base, else None."""
    expert_parallel: Any = None
    """The ``ExpertParallel`` of this rank when ``parallel.expert_parallel_size`` > 1, else None."""

    @property
    def engine_params(self) -> list[nn.Parameter]:
        """What DeepSpeed's engine optimizes: every trainable parameter, less the experts when they are
        shared out over ranks (``parallel.expert_optimizer`` takes those)."""
        return [p for _, p in self.trainable if self.expert_parallel is None or not is_expert_param(p)]

    @property
    def expert_params(self) -> list[tuple[str, nn.Parameter]]:
        """The experts this rank owns under expert parallelism (empty without it)."""
        return [(n, p) for n, p in self.trainable if self.expert_parallel is not None and is_expert_param(p)]


def build_model(plan: ModelPlan) -> BuiltModel:
    """The base (partitioned from construction under ZeRO-3), the adapter injected, ready for
    ``start_engine``."""
    from transformers.integrations import HfDeepSpeedConfig

    from mixlora_ds import inject_mixlora
    from mixlora_ds.model.inject import decoder_layers

    cfg = plan.cfg
    dtype = _DTYPES[plan.precision]
    # Transformers checks this object (through a weak reference) in from_pretrained/from_config and
    # then wraps construction in zero.Init with our config; dropping it would silently build the
    # whole model on every rank.
    hf_ds = HfDeepSpeedConfig(plan.ds_config) if plan.stage == 3 else None
    model = _frozen_base(plan, dtype)
    base_ids = {id(p) for p in model.parameters()}
    # Adapter initialisation must not depend on how the base was built (sharded or not, loaded or
    # random): reseed so every rank and a single-process run draw the same adapter.
    torch.manual_seed(cfg.seed)
    inject_mixlora(model, copy.deepcopy(cfg.adapter))  # injection fills in act_fn and the base path: on its copy
    if cfg.model.init_adapter:
        _load_initial_adapter(model, cfg.model.init_adapter)
    layers = decoder_layers(model)
    expert_parallel = _share_out_experts(model, cfg)
    trainable = _trainable_parameters(model, base_ids)
    if plan.stage == 3 and not plan.shards_base:
        _set_zero3_leaves(model, type(layers[0]), cfg)
    # With a frozen base the embeddings' output does not require grad; a leaf module's (and
    # checkpointing's) backward hooks then never fire unless the input does.
    model.enable_input_require_grads()
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    sharded = None
    if plan.shards_base:
        sharded = shard_frozen_base_of(cfg, model, layers, dtype)
        hf_ds = None  # construction is over: later from_config calls must not enter zero.Init
    if cfg.model.compile:
        compile_layers(layers, cuda_graphs=cfg.model.cuda_graphs)
        if cfg.model.cuda_graphs:
            copy_gradients_out([p for _, p in trainable])
    return BuiltModel(model, trainable, hf_ds, sharded, expert_parallel)


def _frozen_base(plan: ModelPlan, dtype: torch.dtype) -> nn.Module:
    """The base model: loaded from ``model.name_or_path``, else random weights drawn from the seed."""
    from transformers import AutoModelForCausalLM

    m = plan.cfg.model
    torch.manual_seed(plan.cfg.seed)
    kwargs = dict(dtype=dtype, attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code)
    if m.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, local_files_only=True, **kwargs)
    else:
        # The model adopts the config it is given (and writes its dtype into it): the plan's stays as planned.
        model = AutoModelForCausalLM.from_config(copy.deepcopy(plan.hf_config), **kwargs)
    model.config.use_cache = False
    return model


def _load_initial_adapter(model: nn.Module, path: str) -> None:
    """Every rank loads the whole adapter (before experts are shared out, so each keeps its own)."""
    from mixlora_ds.adapter_io import load_adapter_weights, read_adapter_weights

    load_adapter_weights(model, read_adapter_weights(path), source=path)
    logging.getLogger(__name__).info("adapter initialised from %s", path)


def _share_out_experts(model: nn.Module, cfg: TrainConfig):
    """This rank's ``ExpertParallel`` (its own experts kept, the others dropped), or None without it."""
    if cfg.parallel.expert_parallel_size == 1:
        return None
    from mixlora_ds.parallel.expert_parallel import ExpertParallel

    # Every rank draws all experts from the seed, then keeps its own: the same experts as without EP.
    expert_parallel = ExpertParallel.create(cfg.parallel.expert_parallel_size, cfg.deepspeed.timeout_minutes)
    expert_parallel.shard(model)
    return expert_parallel


def _trainable_parameters(model: nn.Module, base_ids: set[int]) -> list[tuple[str, nn.Parameter]]:
    """The adapter's parameters; refuses a base parameter left trainable, or no adapter at all."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    leaked = [n for n, p in trainable if id(p) in base_ids]
    if leaked:
        raise RuntimeError(f"base parameters left trainable after injection: {leaked[:5]}")
    if not trainable:
        raise RuntimeError("the adapter has no trainable parameters")
    return trainable


def _set_zero3_leaves(model: nn.Module, layer_type: type[nn.Module], cfg: TrainConfig) -> None:
    """Mark the modules DeepSpeed's stage-3 engine gathers whole (on entry) instead of module by module."""
    from deepspeed.utils import set_z3_leaf_modules

    from mixlora_ds.model.lora import LoraLinear
    from mixlora_ds.model.moe import MixLoraMoeBlock

    leaves = []  # (module type, whether the model must have one)
    if cfg.adapter.is_mixlora:
        # Experts receive different tokens on different ranks; as a leaf, the whole block's
        # parameters are gathered on entry, so every rank issues the same collectives.
        leaves.append((MixLoraMoeBlock, True))
    if cfg.adapter.use_dora:
        # DoRA's forward reads the whole base weight (for the row norms of W + sBA); as a leaf,
        # the adapted layer and its base weight are gathered together, once.
        leaves.append((LoraLinear, False))
    if cfg.deepspeed.zero3_gather == "layer":
        # One gather per decoder layer instead of one per Linear: far fewer, larger collectives.
        leaves.append((layer_type, True))
    for leaf, required in leaves:
        set_z3_leaf_modules(model, [leaf], raise_if_not_found=required)


def shard_frozen_base_of(cfg: TrainConfig, model: nn.Module, layers: nn.ModuleList, dtype: torch.dtype):
    """Re-shard the (zero.Init-partitioned) frozen base per decoder layer over all ranks, in the run's
    dtype, gathered as ``deepspeed.zero3_gather_transport`` says, ``deepspeed.zero3_prefetch_layers``
    ahead. NCCL gathers run on a process group of their own (with the run's collective timeout), so
    they never queue behind DeepSpeed's gradient reductions."""
    from mixlora_ds import dist
    from mixlora_ds.parallel.frozen_base import shard_frozen_base

    group = dist.new_group(cfg.deepspeed.timeout_minutes)
    transport = _gather_transport(cfg, group)
    return shard_frozen_base(model, layers, group, dtype, transport, cfg.deepspeed.zero3_prefetch_layers)


def _gather_transport(cfg: TrainConfig, group) -> str:
    """``deepspeed.zero3_gather_transport`` for ``group``: "auto" is the copy engine where it works."""
    from mixlora_ds import dist
    from mixlora_ds.parallel import peer_copy

    transport = cfg.deepspeed.zero3_gather_transport
    if group is None:  # one rank: nothing is ever gathered
        return "nccl"
    if transport == "nccl":
        return transport
    why_not = peer_copy.check_available(group, dist.device())
    if why_not is None:
        return "copy_engine"
    if transport == "copy_engine":
        raise cfg.error("deepspeed.zero3_gather_transport",
                        f"deepspeed.zero3_gather_transport=copy_engine is not possible here: {why_not}")
    if dist.device().type == "cuda" and dist.is_main():
        logging.getLogger(__name__).warning("ZeRO-3 gathers by NCCL, not copy engine: %s", why_not)
    return "nccl"


def start_engine(built: BuiltModel, engine_config: dict[str, Any], lr_scheduler=None):
    """``deepspeed.initialize`` for the built model, handing it the trainable parameters it optimizes."""
    import deepspeed

    from mixlora_ds.parallel.expert_optimizer import kept_from_engine
    from mixlora_ds.parallel.frozen_base import hidden_from_engine_broadcast

    with hidden_from_engine_broadcast(built.sharded_base), kept_from_engine([p for _, p in built.expert_params]):
        engine, _, _, _ = deepspeed.initialize(model=built.model, model_parameters=built.engine_params,
                                               config=engine_config, lr_scheduler=lr_scheduler)
    return engine


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer.

    The reentrant variant returns no gradients when no input of the checkpointed block requires
    grad (the frozen base's case); the non-reentrant one tracks the adapter parameters inside.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) element counts, using ZeRO-3's full shapes where parameters are partitioned."""
    total = trainable = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable
