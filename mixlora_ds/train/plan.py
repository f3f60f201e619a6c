"""Check a run config completely, before any rank initialises communication or builds a model.

Every rank runs the same checks on the same files, so a bad config fails on every rank with the
same message and no rank is left waiting in a collective. The result, a :class:`RunPlan`, carries
everything derived from the config (world size, accumulation, total steps, resolved DeepSpeed
config, model and adapter configs).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from mixlora_ds.train.config import TrainConfig, TrainConfigError
from mixlora_ds.train.ds_config import (engine_ds_config, resolve_ds_config, resolve_precision,
                                        shards_base_itself, zero_stage)
from mixlora_ds.train.tokenizer_check import check_data_fits_model


@dataclass
class RunPlan:
    cfg: TrainConfig
    world_size: int
    device: str
    precision: str
    stage: int
    """The ZeRO stage of the DeepSpeed config (3: the frozen base is sharded, see ``shards_base``)."""
    ds_config: dict[str, Any]
    """The resolved DeepSpeed config, as given (construction under ZeRO-3 follows it)."""
    engine_ds_config: dict[str, Any]
    """What DeepSpeed's engine gets (``ds_config.engine_ds_config``)."""
    shards_base: bool
    """mixlora_ds shards the frozen base itself (ZeRO-3 with ``deepspeed.zero3_impl: mixlora_ds``)."""
    hf_config: Any
    adapter_config: Any
    grad_accum: int
    train_sequences: int
    seq_len: int | None
    micro_batches_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_dir: str | None
    manifest: dict[str, Any]


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def _read_manifest(cfg: TrainConfig, key: str, path: str) -> dict[str, Any]:
    manifest = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise TrainConfigError(f"{cfg.where(key)}: {key}={path!r}: data directory not found "
                               f"(prepare it with data_prep/prepare.py)")
    if not os.path.isfile(manifest):
        raise TrainConfigError(f"{cfg.where(key)}: {key}={path!r} has no manifest.json: not a prepared "
                               f"data directory")
    try:
        with open(manifest, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"{manifest}:{e.lineno}: invalid JSON: {e.msg}") from None


def _split_len(cfg: TrainConfig, key: str, data_dir: str, split: str) -> int:
    from mixlora_ds.data.reader import PackedDataset

    try:
        return len(PackedDataset(data_dir, split=split))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise TrainConfigError(f"{cfg.where(key)}: {key}={data_dir!r}, split {split!r}: {e}") from None


def has_split(data_dir: str, split: str) -> bool:
    from mixlora_ds.data.reader import PackedDataset

    try:
        return len(PackedDataset(data_dir, split=split)) > 0
    except (KeyError, ValueError, FileNotFoundError):
        return False


def check_expert_parallel(cfg: TrainConfig, adapter_config, world_size: int, stage: int, shards_base: bool) -> None:
    """``parallel.expert_parallel_size`` against the adapter, the world size and the ZeRO setup."""
    ep = cfg.parallel.expert_parallel_size
    key = "parallel.expert_parallel_size"
    where = cfg.where(key)
    if ep == 1:
        return
    if adapter_config.peft_type != "MIXLORA":
        raise TrainConfigError(f"{where}: {key}={ep} needs a MixLoRA adapter (experts to share out); "
                               f"adapter.peft_type is {adapter_config.peft_type}")
    if adapter_config.num_experts % ep:
        raise TrainConfigError(f"{where}: {key}={ep} does not divide adapter.num_experts="
                               f"{adapter_config.num_experts}; each rank of a group must own as many experts")
    if world_size % ep:
        raise TrainConfigError(f"{where}: {key}={ep} does not divide the world size {world_size}; expert-parallel "
                               f"groups are {ep} consecutive ranks")
    if stage == 3 and not shards_base:
        raise TrainConfigError(f"{where}: {key}={ep} does not work with deepspeed.zero3_impl: deepspeed (DeepSpeed's "
                               f"stage-3 engine refuses mixture-of-experts layers); use deepspeed.zero3_impl: "
                               f"mixlora_ds (the default), which shards the frozen base the same way")
    if stage == 0:
        raise TrainConfigError(f"{where}: {key}={ep} needs ZeRO stage 1, 2 or 3 in the DeepSpeed config "
                               f"({cfg.deepspeed.config}); it has zero_optimization.stage 0")


def make_plan(cfg: TrainConfig, world_size: int, device: str | None = None) -> RunPlan:
    from mixlora_ds.train.build import check_adapter_targets, hf_config_for
    from mixlora_ds.train.schedule import warmup_steps_for

    device = device or accelerator_name()
    # The config's own fields were checked when it was loaded; what follows needs the device, the
    # model, the world size or the data. Cheap checks first: they explain most mistakes.
    if device == "cpu" and cfg.model.attn_implementation.startswith("flash"):
        raise cfg.error("model.attn_implementation", "flash attention needs a GPU; use sdpa on CPU")

    precision = resolve_precision(cfg, device)
    adapter_config = cfg.adapter
    hf_config = hf_config_for(cfg)
    check_adapter_targets(cfg, hf_config, adapter_config)
    ds_config = resolve_ds_config(cfg, world_size, getattr(hf_config, "hidden_size", None), device)
    stage = zero_stage(ds_config)
    grad_accum = ds_config["gradient_accumulation_steps"]
    shards_base = shards_base_itself(cfg, ds_config)
    engine_config = engine_ds_config(cfg, ds_config)
    if cfg.model.compile and stage == 3 and not shards_base:
        raise TrainConfigError(f"{cfg.where('model.compile')}: model.compile does not work with "
                               f"deepspeed.zero3_impl: deepspeed (DeepSpeed's stage-3 parameter hooks run inside "
                               f"the compiled layers); use zero3_impl: mixlora_ds, or model.compile: false")
    check_expert_parallel(cfg, adapter_config, world_size, stage, shards_base)
    if shards_base and cfg.deepspeed.zero3_gather_transport == "copy_engine" and device != "cuda":
        # (whether every rank shares one host is checked when the base is sharded: it takes a collective)
        raise TrainConfigError(f"{cfg.where('deepspeed.zero3_gather_transport')}: "
                               f"deepspeed.zero3_gather_transport=copy_engine needs CUDA GPUs, this run is on "
                               f"{device}; use auto or nccl")

    if not cfg.data.train_dir:
        raise TrainConfigError(f"{cfg.where('data.train_dir')}: data.train_dir is required")
    manifest = _read_manifest(cfg, "data.train_dir", cfg.data.train_dir)
    n_train = _split_len(cfg, "data.train_dir", cfg.data.train_dir, cfg.data.train_split)
    per_rank = n_train // world_size if cfg.data.drop_last else math.ceil(n_train / world_size)
    mb_per_epoch = per_rank // cfg.batch.micro_batch_size
    if mb_per_epoch < 1:
        raise TrainConfigError(
            f"{cfg.where('data.train_dir')}: {n_train} packed training sequences cannot fill one "
            f"micro-batch of {cfg.batch.micro_batch_size} on each of {world_size} ranks"
        )
    seq_len = manifest.get("seq_len") or manifest.get("max_seq_len")
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = max(1, math.floor(cfg.schedule.num_epochs * mb_per_epoch / grad_accum))

    eval_dir = None
    if cfg.data.eval_dir:
        _read_manifest(cfg, "data.eval_dir", cfg.data.eval_dir)
        _split_len(cfg, "data.eval_dir", cfg.data.eval_dir, cfg.data.eval_split)
        eval_dir = cfg.data.eval_dir
    elif has_split(cfg.data.train_dir, cfg.data.eval_split):
        eval_dir = cfg.data.train_dir
    elif cfg.eval.every_steps > 0:
        raise TrainConfigError(
            f"{cfg.where('eval.every_steps')}: eval.every_steps={cfg.eval.every_steps} but there is no "
            f"held-out data: set data.eval_dir or prepare an '{cfg.data.eval_split}' split"
        )
    datasets = [("data.train_dir", cfg.data.train_dir, manifest, cfg.data.train_split)]
    if eval_dir is not None:
        eval_key = "data.eval_dir" if cfg.data.eval_dir else "data.train_dir"
        datasets.append((eval_key, eval_dir, _read_manifest(cfg, eval_key, eval_dir), cfg.data.eval_split))
    check_data_fits_model(cfg, hf_config, datasets)
    warmup = warmup_steps_for(cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio, total)
    return RunPlan(cfg, world_size, device, precision, stage, ds_config, engine_config, shards_base, hf_config,
                   adapter_config, grad_accum, n_train, seq_len, mb_per_epoch, total, warmup, eval_dir, manifest)
