"""Load a DeepSpeed JSON, fill its "auto" values from the run config, and refuse contradictions.

Raw DeepSpeed does not understand Hugging Face's "auto"; this module resolves the same keys
Transformers resolves (batch sizes, clipping, precision, optimizer hyper-parameters, ZeRO bucket
sizes from the hidden size) and refuses any other "auto" with the key's name. Explicit values that
disagree with the run config are errors, not silent winners: one source of truth per number.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from mixlora_ds.train.config import TrainConfig, TrainConfigError
from mixlora_ds.utils.jsonfile import load_json

AUTO = "auto"


def load_ds_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise TrainConfigError(f"{path}: DeepSpeed config not found")
    data = load_json(path, TrainConfigError)
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def find_ds_config_path(cfg: TrainConfig) -> str:
    p = cfg.deepspeed.config
    if os.path.isabs(p) or os.path.exists(p):
        return os.path.abspath(p)
    if cfg.source not in ("<defaults>", ""):
        beside = os.path.join(os.path.dirname(os.path.abspath(cfg.source)), p)
        if os.path.exists(beside):
            return beside
        # configs/x.yaml naming ds_configs/y.json: try the run file's parent (the project root).
        up = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cfg.source))), p)
        if os.path.exists(up):
            return up
    return os.path.abspath(p)


def _fill(d: dict[str, Any], key: str, value: Any, where: str, dotted: str, what: str) -> None:
    """Set ``d[key]`` when absent or "auto"; otherwise it must equal ``value``."""
    if key not in d or d[key] == AUTO:
        d[key] = value
        return
    have = d[key]
    same = have == value or (
        isinstance(have, (int, float)) and isinstance(value, (int, float)) and abs(have - value) <= 1e-12 * max(1, abs(value))
    )
    if isinstance(have, list) and isinstance(value, list):
        same = len(have) == len(value) and all(abs(a - b) <= 1e-12 for a, b in zip(have, value))
    if not same:
        raise TrainConfigError(
            f"{where}: '{dotted}' is {have!r} but the run config gives {value!r} ({what}); "
            f'remove it or set it to "auto"'
        )


def resolve_ds_config(cfg: TrainConfig, world_size: int, hidden_size: int | None, device: str) -> dict[str, Any]:
    """The DeepSpeed dict to hand to ``deepspeed.initialize`` for this run and world size."""
    path = find_ds_config_path(cfg)
    raw = deep_merge(load_ds_json(path), cfg.deepspeed.overrides)
    ds = copy.deepcopy(raw)
    where = path if not cfg.deepspeed.overrides else f"{path} (+ deepspeed.overrides)"

    micro = cfg.batch.micro_batch_size
    per_step = micro * world_size
    if cfg.batch.global_batch_size % per_step:
        raise cfg.error("batch.global_batch_size",
                        f"batch.global_batch_size={cfg.batch.global_batch_size} is not divisible by "
                        f"micro_batch_size ({micro}) x world size ({world_size}) = {per_step}")
    gas = cfg.batch.global_batch_size // per_step
    _fill(ds, "train_micro_batch_size_per_gpu", micro, where, "train_micro_batch_size_per_gpu", "batch.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", gas, where, "gradient_accumulation_steps",
          "global / (micro x world size)")
    _fill(ds, "train_batch_size", cfg.batch.global_batch_size, where, "train_batch_size", "batch.global_batch_size")
    _fill(ds, "gradient_clipping", float(cfg.optim.max_grad_norm), where, "gradient_clipping", "optim.max_grad_norm")

    # Precision: bf16 or fp32. fp16 needs loss scaling this loop does not do.
    precision = resolve_precision(cfg, device)
    fp16 = ds.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, AUTO):
        raise TrainConfigError(f"{where}: fp16 is not supported (no loss scaling); use bf16 or fp32")
    ds.pop("fp16", None)
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", precision == "bf16", where, "bf16.enabled", f"precision={precision}")

    if "scheduler" in ds:
        raise TrainConfigError(
            f"{where}: a 'scheduler' section is not used; the learning-rate schedule lives in the run "
            f"config's 'schedule' section (warmup + constant/cosine/linear), saved with each checkpoint"
        )

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", 3)
    if stage not in (0, 1, 2, 3):
        raise TrainConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    _check_zero_section(zero, where)
    offload = isinstance(zero.get("offload_optimizer"), dict) and zero["offload_optimizer"].get("device", "none") != "none"
    _resolve_optimizer(cfg, ds, where, offload)

    if hidden_size is not None:
        # Transformers' choices for the bucket sizes that depend on the model width.
        for key, value in (
            ("reduce_bucket_size", hidden_size * hidden_size),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
            ("stage3_param_persistence_threshold", 10 * hidden_size),
        ):
            if zero.get(key) == AUTO:
                zero[key] = value

    ds.setdefault("steps_per_print", 10**9)  # our own logger reports; keep DeepSpeed's quiet
    ds.setdefault("wall_clock_breakdown", False)
    leftover = list(_find_auto(ds, ""))
    if leftover:
        raise TrainConfigError(
            f"{where}: '{leftover[0]}' is \"auto\", which is not resolved here (only batch sizes, clipping, "
            f"precision, optimizer hyper-parameters and ZeRO bucket sizes are); give an explicit value"
        )
    return ds


def _check_zero_section(zero: dict[str, Any], where: str) -> None:
    """DeepSpeed's own schema for the ZeRO section, applied now instead of after the model is built."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    checked = {k: v for k, v in zero.items() if v != AUTO}  # "auto" sizes are filled in below
    try:
        DeepSpeedZeroConfig(**checked)
    except Exception as e:  # pydantic.ValidationError, without importing pydantic here
        errors = getattr(e, "errors", None)
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in errors()) if errors else str(e)
        raise TrainConfigError(f"{where}: invalid zero_optimization section: {detail}") from None


def _resolve_optimizer(cfg: TrainConfig, ds: dict[str, Any], where: str, offload: bool) -> None:
    o = cfg.optim
    if o.impl == "cpu_adam" and not offload:
        raise cfg.error("optim.impl", f"optim.impl=cpu_adam needs zero_optimization.offload_optimizer in {where}")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if not isinstance(opt, dict):
        raise TrainConfigError(f"{where}: 'optimizer' must be an object")
    if opt.get("type", AUTO) == AUTO:
        opt["type"] = "AdamW"
    if opt["type"] not in ("AdamW", "Adam"):
        raise TrainConfigError(f"{where}: optimizer.type must be AdamW (got {opt['type']!r})")
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    _fill(params, "lr", float(o.lr), where, "optimizer.params.lr", "optim.lr")
    _fill(params, "betas", [float(b) for b in o.betas], where, "optimizer.params.betas", "optim.betas")
    _fill(params, "eps", float(o.eps), where, "optimizer.params.eps", "optim.eps")
    _fill(params, "weight_decay", float(o.weight_decay), where, "optimizer.params.weight_decay", "optim.weight_decay")
    # "torch_adam" picks torch.optim.AdamW, which needs no JIT build; DeepSpeed otherwise picks
    # FusedAdam, or DeepSpeedCPUAdam under offload.
    _fill(params, "torch_adam", o.impl == "torch", where, "optimizer.params.torch_adam", f"optim.impl={o.impl}")
    if o.impl == "fused" and offload:
        raise cfg.error("optim.impl", "optim.impl=fused cannot run with optimizer offload; use cpu_adam or torch")


def _find_auto(d: Any, prefix: str):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _find_auto(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _find_auto(v, f"{prefix}[{i}]")
    elif d == AUTO:
        yield prefix


# Keys of the ZeRO section that only DeepSpeed's stage-3 engine reads (with their aliases).
_STAGE3_ONLY = {
    "offload_param", "sub_group_size", "cpu_offload_param", "cpu_offload_use_pin_memory",
    "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold",
    "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save",
    "module_granularity_threshold", "use_all_reduce_for_fetch_params", "allgather_sequential",
    "stage3_gather_fp16_weights_on_model_save", "zero_hpz_partition_size", "zero_quantized_weights",
    "zero_quantized_nontrainable_weights", "zero_quantized_gradients", "memory_efficient_linear",
    "pipeline_loading_checkpoint", "override_module_apply", "leaf_module", "mics_shard_size",
    "mics_hierarchical_params_gather",
}


def shards_base_itself(cfg: TrainConfig, ds: dict[str, Any]) -> bool:
    """True when mixlora_ds, not DeepSpeed's stage-3 engine, shards the frozen base."""
    return zero_stage(ds) == 3 and cfg.deepspeed.zero3_impl == "mixlora_ds"


def engine_ds_config(cfg: TrainConfig, ds: dict[str, Any]) -> dict[str, Any]:
    """The dict DeepSpeed's engine gets for the resolved config ``ds``.

    That is ``ds`` itself, except under ZeRO-3 with ``deepspeed.zero3_impl: mixlora_ds``: the frozen
    base is then sharded by ``mixlora_ds.parallel`` and the engine runs stage 2 for the trainable
    adapter, so the stage-3-only keys are dropped: they tune how DeepSpeed's engine gathers, which
    it no longer does. Stage-3 features that this sharding or a stage-2 engine does not provide
    (parameter offload, NVMe or partial optimizer offload, quantized weights or gradients,
    hierarchical or MiCS partitioning) are refused rather than silently dropped.
    """
    if not shards_base_itself(cfg, ds):
        return ds
    where = find_ds_config_path(cfg)
    zero = ds["zero_optimization"]
    offload_param = zero.get("offload_param") if isinstance(zero.get("offload_param"), dict) else {}
    offload_optimizer = zero.get("offload_optimizer") if isinstance(zero.get("offload_optimizer"), dict) else {}
    unsupported = {
        "offload_param": offload_param.get("device", "none") != "none",
        "cpu_offload_param": bool(zero.get("cpu_offload_param")),
        "offload_optimizer.device nvme": offload_optimizer.get("device") == "nvme",
        "offload_optimizer.ratio": float(offload_optimizer.get("ratio", 1.0)) != 1.0,
        "zero_quantized_weights": bool(zero.get("zero_quantized_weights")),
        "zero_quantized_nontrainable_weights": bool(zero.get("zero_quantized_nontrainable_weights")),
        "zero_quantized_gradients": bool(zero.get("zero_quantized_gradients")),
        "zero_hpz_partition_size": int(zero.get("zero_hpz_partition_size", 1)) > 1,
        "mics_shard_size": int(zero.get("mics_shard_size", -1)) > 0,
    }
    for key, used in unsupported.items():
        if used:
            raise TrainConfigError(
                f"{where}: zero_optimization.{key} needs DeepSpeed's own stage-3 engine; set "
                f"deepspeed.zero3_impl: deepspeed in the run config ({cfg.where('deepspeed')})"
            )
    engine = copy.deepcopy(ds)
    engine["zero_optimization"] = {k: v for k, v in zero.items()
                                   if k not in _STAGE3_ONLY and not k.startswith("stage3_")}
    engine["zero_optimization"]["stage"] = 2
    return engine


def resolve_precision(cfg: TrainConfig, device: str) -> str:
    if cfg.precision == "auto":
        return "fp32" if device == "cpu" else "bf16"
    return cfg.precision


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
