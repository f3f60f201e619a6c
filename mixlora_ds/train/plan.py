"""Check a run config against the device, the model, the world size and the data, before any rank
initialises communication or builds a model, and derive what the run needs from them once.

The config's own fields were checked when it was loaded; what is checked here needs more than the
config. Every rank runs the same checks on the same files, cheap ones first, so a bad config fails
on every rank with the same message and no rank is left waiting in a collective. The result, a
:class:`RunPlan`, carries everything derived (precision, resolved DeepSpeed config, model config,
accumulation, total steps); ``build_model`` and the training loop take it as it is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.shards import read_manifest
from mixlora_ds.train.base_model import check_adapter_targets, check_init_adapter, hf_config_for, model_skeleton
from mixlora_ds.train.config import TrainConfig
from mixlora_ds.train.ds_config import (engine_ds_config, resolve_ds_config, resolve_precision,
                                        shards_base_itself, zero_stage)
from mixlora_ds.train.schedule import warmup_steps_for
from mixlora_ds.train.tokenizer_check import check_data_fits_model


@dataclass(frozen=True)
class ModelPlan:
    """What building the model takes (``build.build_model``)."""

    cfg: TrainConfig
    hf_config: Any
    """The base model's Transformers config."""
    precision: str
    """"bf16" or "fp32": the config's ``precision`` for this device."""
    stage: int
    """The ZeRO stage of the DeepSpeed config (3: the frozen base is sharded, see ``shards_base``)."""
    ds_config: dict[str, Any]
    """The resolved DeepSpeed config, as given (construction under ZeRO-3 follows it)."""
    shards_base: bool
    """mixlora_ds shards the frozen base itself (ZeRO-3 with ``deepspeed.zero3_impl: mixlora_ds``)."""


@dataclass(frozen=True)
class RunPlan(ModelPlan):
    """Everything derived from the config for a run on ``world_size`` ranks."""

    world_size: int
    device: str
    engine_ds_config: dict[str, Any]
    """What DeepSpeed's engine gets (``ds_config.engine_ds_config``)."""
    grad_accum: int
    train_sequences: int
    seq_len: int
    """Tokens per packed row of the training data."""
    micro_batches_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_dir: str | None
    task_names: list[str]
    """The training data's tasks, in task-id order."""

    def summary(self) -> str:
        """The values people look for in a training log, on one line (the whole resolved config is
        in the run directory: run_config.yaml, ds_config.json)."""
        cfg, adapter = self.cfg, self.cfg.adapter
        model = cfg.model.name_or_path or f"random {self.hf_config.model_type} weights"
        kind = f"{adapter.peft_type}{' (DoRA)' if adapter.use_dora else ''} r {adapter.r}"
        if adapter.is_mixlora:
            routing = {"mixlora": f"top-k {adapter.top_k}", "mixlora-dynamic": f"top-p {adapter.top_p}",
                       "mixlora-switch": "switch"}[adapter.routing_strategy]
            kind += f", {adapter.num_experts} experts, {routing}"
        return (f"model {model}; adapter {kind}; world {self.world_size}, ZeRO stage {self.stage}, {self.precision}; "
                f"batch {cfg.batch.micro_batch_size} per rank, {cfg.batch.global_batch_size} per step, "
                f"grad accum {self.grad_accum}; lr {cfg.optim.lr:g}, {self.total_steps} steps")


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def make_plan(cfg: TrainConfig, world_size: int, device: str | None = None) -> RunPlan:
    """The plan of a run of ``cfg`` on ``world_size`` ranks of ``device`` (default: the accelerator's);
    a ``TrainConfigError`` naming the key for anything that cannot work."""
    device = device or accelerator_name()
    check_attention(cfg, device)
    precision = resolve_precision(cfg, device)
    hf_config = hf_config_for(cfg)
    skeleton = model_skeleton(hf_config)
    check_adapter_targets(cfg, skeleton)
    check_init_adapter(cfg, skeleton)
    ds_config = resolve_ds_config(cfg, world_size, getattr(hf_config, "hidden_size", None), device)
    stage = zero_stage(ds_config)
    grad_accum = ds_config["gradient_accumulation_steps"]
    shards_base = shards_base_itself(cfg, ds_config)
    engine_config = engine_ds_config(cfg, ds_config)
    check_compile(cfg, stage, shards_base, device)
    check_expert_parallel(cfg, world_size, stage, shards_base)
    check_gather_transport(cfg, shards_base, device)

    manifest, n_train, mb_per_epoch = training_data(cfg, world_size)
    held_out = held_out_data(cfg, manifest)
    eval_dir = held_out[1] if held_out is not None else None
    datasets = [("data.train_dir", cfg.data.train_dir, manifest, cfg.data.train_split)]
    if held_out is not None:
        datasets.append((*held_out, cfg.data.eval_split))
    check_data_fits_model(cfg, hf_config, datasets)
    total = total_steps(cfg, mb_per_epoch, grad_accum)
    return RunPlan(
        cfg=cfg, hf_config=hf_config, precision=precision, stage=stage, ds_config=ds_config,
        shards_base=shards_base, world_size=world_size, device=device, engine_ds_config=engine_config,
        grad_accum=grad_accum, train_sequences=n_train, seq_len=manifest["seq_len"],
        micro_batches_per_epoch=mb_per_epoch, total_steps=total,
        warmup_steps=warmup_steps_for(cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio, total),
        eval_dir=eval_dir, task_names=list(manifest["tasks"]))


# ------------------------------------------------------------------------------- the device and ZeRO
def check_attention(cfg: TrainConfig, device: str) -> None:
    if device == "cpu" and cfg.model.attn_implementation.startswith("flash"):
        raise cfg.error("model.attn_implementation", "flash attention needs a GPU; use sdpa on CPU")


def check_compile(cfg: TrainConfig, stage: int, shards_base: bool, device: str) -> None:
    if cfg.model.compile and stage == 3 and not shards_base:
        raise cfg.error("model.compile", "model.compile does not work with deepspeed.zero3_impl: deepspeed "
                                         "(DeepSpeed's stage-3 parameter hooks run inside the compiled layers); "
                                         "use zero3_impl: mixlora_ds, or model.compile: false")
    if not cfg.model.cuda_graphs:
        return
    why = None
    if device != "cuda":
        why = f"needs CUDA GPUs, this run is on {device}"
    elif stage == 3:
        why = "does not work with ZeRO-3 (each step gathers the layers' weights into new memory)"
    elif cfg.parallel.expert_parallel_size > 1:
        why = "does not work with expert parallelism (the all-to-all's sizes depend on the routing)"
    if why:
        raise cfg.error("model.cuda_graphs", f"model.cuda_graphs {why}; set model.cuda_graphs: false")


def check_gather_transport(cfg: TrainConfig, shards_base: bool, device: str) -> None:
    # (whether every rank shares one host is checked when the base is sharded: it takes a collective)
    if shards_base and cfg.deepspeed.zero3_gather_transport == "copy_engine" and device != "cuda":
        raise cfg.error("deepspeed.zero3_gather_transport",
                        f"deepspeed.zero3_gather_transport=copy_engine needs CUDA GPUs, this run is on {device}; "
                        f"use auto or nccl")


def check_expert_parallel(cfg: TrainConfig, world_size: int, stage: int, shards_base: bool) -> None:
    """``parallel.expert_parallel_size`` against the adapter, the world size and the ZeRO setup."""
    ep = cfg.parallel.expert_parallel_size
    key = "parallel.expert_parallel_size"
    adapter = cfg.adapter
    if ep == 1:
        return
    if not adapter.is_mixlora:
        raise cfg.error(key, f"{key}={ep} needs a MixLoRA adapter (experts to share out); adapter.peft_type is "
                             f"{adapter.peft_type}")
    if adapter.num_experts % ep:
        raise cfg.error(key, f"{key}={ep} does not divide adapter.num_experts={adapter.num_experts}; each rank "
                             f"of a group must own as many experts")
    if world_size % ep:
        raise cfg.error(key, f"{key}={ep} does not divide the world size {world_size}; expert-parallel groups "
                             f"are {ep} consecutive ranks")
    if stage == 3 and not shards_base:
        raise cfg.error(key, f"{key}={ep} does not work with deepspeed.zero3_impl: deepspeed (DeepSpeed's "
                             f"stage-3 engine refuses mixture-of-experts layers); use deepspeed.zero3_impl: "
                             f"mixlora_ds (the default), which shards the frozen base the same way")
    if stage == 0:
        raise cfg.error(key, f"{key}={ep} needs ZeRO stage 1, 2 or 3 in the DeepSpeed config "
                             f"({cfg.deepspeed.config}); it has zero_optimization.stage 0")


# ------------------------------------------------------------------------------------------ data
def training_data(cfg: TrainConfig, world_size: int) -> tuple[dict[str, Any], int, int]:
    """The training data's manifest, its packed rows, and the micro-batches each rank gets per epoch."""
    if not cfg.data.train_dir:
        raise cfg.error("data.train_dir", "data.train_dir is required")
    manifest = _read_manifest(cfg, "data.train_dir", cfg.data.train_dir)
    n_train = _split_len(cfg, "data.train_dir", cfg.data.train_dir, cfg.data.train_split)
    per_rank = n_train // world_size if cfg.data.drop_last else math.ceil(n_train / world_size)
    mb_per_epoch = per_rank // cfg.batch.micro_batch_size
    if mb_per_epoch < 1:
        raise cfg.error("data.train_dir", f"{n_train} packed training sequences cannot fill one micro-batch of "
                                          f"{cfg.batch.micro_batch_size} on each of {world_size} ranks")
    return manifest, n_train, mb_per_epoch


def held_out_data(cfg: TrainConfig, train_manifest: dict[str, Any]) -> tuple[str, str, dict[str, Any]] | None:
    """(config key, directory, manifest) of the held-out data: ``data.eval_dir``, else the
    ``data.eval_split`` of the training data when it has one; None when there is none."""
    if cfg.data.eval_dir:
        manifest = _read_manifest(cfg, "data.eval_dir", cfg.data.eval_dir)
        _split_len(cfg, "data.eval_dir", cfg.data.eval_dir, cfg.data.eval_split)
        return "data.eval_dir", cfg.data.eval_dir, manifest
    if has_split(cfg.data.train_dir, cfg.data.eval_split):
        return "data.train_dir", cfg.data.train_dir, train_manifest
    if cfg.eval.every_steps > 0:
        raise cfg.error("eval.every_steps", f"eval.every_steps={cfg.eval.every_steps} but there is no held-out "
                                            f"data: set data.eval_dir or prepare an '{cfg.data.eval_split}' split")
    return None


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``schedule.num_epochs`` over the training data."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.floor(cfg.schedule.num_epochs * micro_batches_per_epoch / grad_accum))


def _read_manifest(cfg: TrainConfig, key: str, path: str) -> dict[str, Any]:
    """The manifest prepare wrote in ``path`` (``data.shards.read_manifest``), errors placed at ``key``."""
    if not os.path.isdir(path):
        raise cfg.error(key, f"{key}={path!r}: data directory not found (prepare it with data_prep/prepare.py)")
    try:
        return read_manifest(path)
    except DataError as e:
        raise cfg.error(key, f"{key}: {e}") from None


def _split_len(cfg: TrainConfig, key: str, data_dir: str, split: str) -> int:
    from mixlora_ds.data.reader import PackedDataset

    try:
        return len(PackedDataset(data_dir, split=split))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise cfg.error(key, f"{key}={data_dir!r}, split {split!r}: {e}") from None


def has_split(data_dir: str, split: str) -> bool:
    from mixlora_ds.data.reader import PackedDataset

    try:
        return len(PackedDataset(data_dir, split=split)) > 0
    except (KeyError, ValueError, FileNotFoundError):
        return False
