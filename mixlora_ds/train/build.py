"""Build the frozen base model (sharded from the start under ZeRO-3) and attach the adapter.

Under ZeRO-3 the base is created inside ``deepspeed.zero.Init`` (through Transformers'
``HfDeepSpeedConfig``, which also makes ``from_pretrained`` load each rank's shard only), so no rank
ever holds the whole model. The adapter is then injected on the partitioned model: injection reads
module names and shapes, never weight values. With ``deepspeed.zero3_impl: mixlora_ds`` (the
default) the partitioned frozen weights are then re-sharded per decoder layer, one layer at a time
(``mixlora_ds.parallel``), and the engine runs stage 2 for the adapter; with ``deepspeed``,
DeepSpeed's stage-3 engine keeps them and partitions the adapter when the engine is created.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import mixlora_ds.parallel  # noqa: F401 - registers the gatherers of partitioned weights (model/partitioned.py)
from mixlora_ds.model.experts import is_expert_param
from mixlora_ds.train.config import TrainConfig, TrainConfigError, where_of

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class BuiltModel:
    model: nn.Module
    adapter_config: Any
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


def hf_config_for(cfg: TrainConfig):
    """The Transformers config of the base model, from a local directory or the run file."""
    from transformers import AutoConfig

    m = cfg.model
    if m.name_or_path:
        path = m.name_or_path
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise TrainConfigError(
                f"{where_of(cfg, 'model.name_or_path')}: model.name_or_path={path!r} is not a local model "
                f"directory with a config.json (nothing is downloaded)"
            )
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=m.trust_remote_code)
    if m.config is None:
        raise TrainConfigError(f"{where_of(cfg, 'model')}: give model.name_or_path or model.config")
    if isinstance(m.config, str):
        if not os.path.isfile(m.config):
            raise TrainConfigError(f"{where_of(cfg, 'model.config')}: model.config file {m.config!r} not found")
        with open(m.config, encoding="utf-8") as f:
            d = json.load(f)
    else:
        d = dict(m.config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise TrainConfigError(f"{where_of(cfg, 'model.config')}: model.config needs a 'model_type' (e.g. llama)")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError) as e:
        raise TrainConfigError(f"{where_of(cfg, 'model.config')}: {e}") from None


def adapter_config_for(cfg: TrainConfig):
    from mixlora_ds.config import ConfigError, MixLoraConfig

    try:
        return MixLoraConfig(**cfg.adapter)
    except TypeError as e:  # an unknown field
        raise TrainConfigError(f"{where_of(cfg, 'adapter')}: adapter: {e}") from None
    except ConfigError as e:
        key = str(e).split("'")[1] if "'" in str(e) else ""
        raise TrainConfigError(f"{where_of(cfg, 'adapter.' + key if key else 'adapter')}: {e}") from None


@contextlib.contextmanager
def plain_construction():
    """Build models without zero.Init even while a ZeRO-3 run's ``HfDeepSpeedConfig`` is alive.

    Transformers wraps every ``from_config``/``from_pretrained`` in ``zero.Init`` (a collective)
    while that object exists; rank-0-only helpers (export verification on a meta skeleton) must
    not start collectives the other ranks never join.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def check_adapter_targets(cfg: TrainConfig, hf_config, adapter_config) -> None:
    """Fail before any heavy work when the adapter targets projections the model does not have.

    The model skeleton is built on the meta device (no memory, a second or two even for 7B).
    """
    from transformers import AutoModelForCausalLM

    with plain_construction(), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    leaf_names = {name.rsplit(".", 1)[-1] for name, mod in skeleton.named_modules() if isinstance(mod, nn.Linear)}
    missing = [t for t in adapter_config.target_modules if t not in leaf_names]
    if missing:
        raise TrainConfigError(
            f"{where_of(cfg, 'adapter.target_modules')}: adapter.target_modules {missing} not found in the "
            f"{hf_config.model_type} model; its linear layers are {sorted(leaf_names)}"
        )


def build_model(cfg: TrainConfig, ds_config: dict[str, Any], precision: str, stage: int) -> BuiltModel:
    """The base (partitioned from construction under ZeRO-3), the adapter injected, ready for
    ``start_engine``. ``ds_config`` is the resolved DeepSpeed config as given (stage 3 included)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from mixlora_ds import inject_mixlora
    from mixlora_ds.train.ds_config import shards_base_itself

    shard_base = shards_base_itself(cfg, ds_config)
    deepspeed_stage3 = stage == 3 and not shard_base
    hf_config = hf_config_for(cfg)
    adapter_config = adapter_config_for(cfg)
    dtype = _DTYPES[precision]
    # Transformers checks this object (through a weak reference) in from_pretrained/from_config and
    # then wraps construction in zero.Init with our config; dropping it would silently build the
    # whole model on every rank.
    hf_ds = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    torch.manual_seed(cfg.seed)
    kwargs = dict(dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    if cfg.model.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path, local_files_only=True, trust_remote_code=cfg.model.trust_remote_code, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    model.config.use_cache = False

    base_ids = {id(p) for p in model.parameters()}
    # Adapter initialisation must not depend on how the base was built (sharded or not, loaded or
    # random): reseed so every rank and a single-process run draw the same adapter.
    torch.manual_seed(cfg.seed)
    inject_mixlora(model, adapter_config)
    expert_parallel = None
    if cfg.parallel.expert_parallel_size > 1:
        from mixlora_ds.parallel.expert_parallel import ExpertParallel

        # Every rank draws all experts from the seed, then keeps its own: the same experts as without EP.
        expert_parallel = ExpertParallel.create(cfg.parallel.expert_parallel_size, cfg.deepspeed.timeout_minutes)
        expert_parallel.shard(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    leaked = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in base_ids]
    if leaked:
        raise RuntimeError(f"base parameters left trainable after injection: {leaked[:5]}")
    if not trainable:
        raise RuntimeError("the adapter has no trainable parameters")

    if deepspeed_stage3 and adapter_config.peft_type == "MIXLORA":
        from deepspeed.utils import set_z3_leaf_modules

        from mixlora_ds.model.moe import MixLoraMoeBlock

        # Experts receive different tokens on different ranks; as a leaf, the whole block's
        # parameters are gathered on entry, so every rank issues the same collectives.
        set_z3_leaf_modules(model, [MixLoraMoeBlock])
    if deepspeed_stage3 and adapter_config.use_dora:
        from deepspeed.utils import set_z3_leaf_modules

        from mixlora_ds.model.lora import LoraLinear

        # DoRA's forward reads the whole base weight (for the row norms of W + sBA); as a leaf,
        # the adapted layer and its base weight are gathered together, once.
        set_z3_leaf_modules(model, [LoraLinear], raise_if_not_found=False)
    if deepspeed_stage3 and cfg.deepspeed.zero3_gather == "layer":
        from deepspeed.utils import set_z3_leaf_modules

        from mixlora_ds.model.inject import decoder_layers

        # One gather per decoder layer instead of one per Linear: far fewer, larger collectives.
        set_z3_leaf_modules(model, [type(decoder_layers(model)[0])])
    # With a frozen base the embeddings' output does not require grad; a leaf module's (and
    # checkpointing's) backward hooks then never fire unless the input does.
    model.enable_input_require_grads()
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    sharded = None
    if shard_base:
        sharded = shard_frozen_base_of(cfg, model, dtype)
        hf_ds = None  # construction is over: later from_config calls must not enter zero.Init
    if cfg.model.compile:
        from mixlora_ds.model.inject import decoder_layers

        for layer in decoder_layers(model):
            # The forward only: module hooks (the sharded base's) stay outside the graph. Identical
            # layers share one compiled graph.
            layer.forward = torch.compile(layer.forward)
    return BuiltModel(model, adapter_config, trainable, hf_ds, sharded, expert_parallel)


def shard_frozen_base_of(cfg: TrainConfig, model: nn.Module, dtype: torch.dtype):
    """Re-shard the (zero.Init-partitioned) frozen base per decoder layer over all ranks, in the run's
    dtype, gathered as ``deepspeed.zero3_gather_transport`` says. NCCL gathers run on a process
    group of their own (with the run's collective timeout), so they never queue behind DeepSpeed's
    gradient reductions."""
    from mixlora_ds import dist
    from mixlora_ds.model.inject import decoder_layers
    from mixlora_ds.parallel import peer_copy
    from mixlora_ds.parallel.frozen_base import shard_frozen_base

    group = dist.new_group(cfg.deepspeed.timeout_minutes)
    transport = cfg.deepspeed.zero3_gather_transport
    if group is None:  # one rank: nothing is ever gathered
        transport = "nccl"
    elif transport != "nccl":
        why_not = peer_copy.check_available(group, dist.device())
        if why_not is not None and transport == "copy_engine":
            raise TrainConfigError(f"{where_of(cfg, 'deepspeed.zero3_gather_transport')}: "
                                   f"deepspeed.zero3_gather_transport=copy_engine is not possible here: {why_not}")
        if why_not is not None and dist.device().type == "cuda" and dist.is_main():
            logging.getLogger(__name__).warning("ZeRO-3 gathers by NCCL, not copy engine: %s", why_not)
        transport = "nccl" if why_not is not None else "copy_engine"
    sharded = shard_frozen_base(model, decoder_layers(model), group, dtype, transport)
    sharded.prefetch_layers = cfg.deepspeed.zero3_prefetch_layers
    return sharded


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
