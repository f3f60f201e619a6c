"""Save and load adapters in the reference formats.

MixLoRA adapters use the reference ``mixlora`` key names, so adapters move both ways:
    mixlora.layers.{i}.mlp.moe_gate.weight                              [E, D]
    mixlora.layers.{i}.self_attn.{proj}.lora_A.weight / lora_B.weight   [r, in] / [out, r]
    mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_A.weight / lora_B.weight
DoRA magnitudes are saved too (``...lora_magnitude_vector``), which the reference drops.
Plain LoRA / DoRA baselines use PEFT's layout (``base_model.model.model.layers...``) so PEFT loads them.

Weights are written both as ``adapter_model.bin`` (what the reference reads) and
``adapter_model.safetensors``; the directory is replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mixlora_ds.config import ConfigError, MixLoraConfig
from mixlora_ds.model.inject import inject_mixlora
from mixlora_ds.model.partitioned import gathered
from mixlora_ds.utils.atomic import atomic_directory
from mixlora_ds.utils.jsonfile import load_json

CONFIG_NAME = "adapter_config.json"
BIN_NAME = "adapter_model.bin"
SAFETENSORS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_MIXLORA_LAYER = re.compile(r"mixlora\.layers\.(\d+)\.(.+)")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded into this model; the message says why and where."""


# -------------------------------------------------------------------------------------- file keys
# What follows "layers.{i}." in a file key. The router: "mlp.moe_gate.weight" (reference) or
# "gate.weight" (legacy m-LoRA <= 0.3). Expert tensors: "mlp.{proj}.experts.{j}..." (reference) or
# "experts.{j}.{proj}..." (legacy, with w1/w2/w3 projection names).
_ROUTER = re.compile(r"(?:mlp\.moe_gate|gate)\.weight")
_EXPERT = re.compile(r"mlp\.(?P<proj>\w+)\.experts\.(?P<expert>\d+)\."
                     r"(?:(?P<kind>lora_A|lora_B)\.weight|lora_magnitude_vector)")
_LEGACY_EXPERT = re.compile(r"experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<kind>lora_A|lora_B)\.weight")
_LEGACY_EXPERT_PROJ = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
_LORA = re.compile(r"(?P<block>self_attn|mlp)\.(?P<proj>\w+)\."
                   r"(?:(?P<kind>lora_A|lora_B)\.weight|lora_magnitude_vector)")


@dataclass(frozen=True)
class TensorKey:
    """What one tensor of an adapter file is, read from its key."""

    layer: int
    """Decoder layer index."""
    block: str
    """"self_attn" or "mlp"."""
    proj: str | None
    """The projection it adapts, by the model's name; None for the router."""
    expert: int | None
    """Expert index of an expert LoRA tensor."""
    kind: str
    """"lora_A", "lora_B", "lora_magnitude_vector" (DoRA) or "router"."""


def parse_tensor_key(key: str) -> TensorKey | None:
    """The tensor a file key names, whatever comes before ``layers.{i}.`` (``mixlora.``, PEFT's
    ``base_model.model.model.``); None for a key of no known kind."""
    m = _LAYER.search(key)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if _ROUTER.fullmatch(rest):
        return TensorKey(layer, "mlp", None, None, "router")
    e = _EXPERT.fullmatch(rest) or _LEGACY_EXPERT.fullmatch(rest)
    if e is not None:
        proj = _LEGACY_EXPERT_PROJ.get(e["proj"], e["proj"])
        return TensorKey(layer, "mlp", proj, int(e["expert"]), e["kind"] or "lora_magnitude_vector")
    p = _LORA.fullmatch(rest)
    if p is not None:
        return TensorKey(layer, p["block"], p["proj"], None, p["kind"] or "lora_magnitude_vector")
    return None


# ----------------------------------------------------------------------------------- name mapping
def to_reference_state_dict(named: dict[str, torch.Tensor], config: MixLoraConfig) -> dict[str, torch.Tensor]:
    """Trainable tensors by module-tree name -> the file layout of ``config.peft_type``.

    Works on live parameters and on tensors gathered from ZeRO-3 shards alike (names may carry a
    wrapper prefix such as ``module.``).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        m = _LAYER.search(name)
        if m is None:
            raise AdapterError(f"trainable tensor {name!r} is not inside a decoder layer")
        layer, rest = m.group(1), m.group(2)
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if not config.is_mixlora:
            out[_PEFT_PREFIX + f"model.layers.{layer}." + rest] = tensor
            continue
        if rest == "mlp.router.weight":
            out[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = tensor
        elif rest.startswith("mlp.experts."):
            _, _, proj, kind = rest.split(".")
            for j in range(tensor.shape[0]):
                suffix = f"{kind}.weight" if kind in ("lora_A", "lora_B") else kind
                out[f"mixlora.layers.{layer}.mlp.{proj}.experts.{j}.{suffix}"] = tensor[j].clone()
        else:
            out[f"mixlora.layers.{layer}." + rest] = tensor
    return out


def from_reference_state_dict(weights: dict[str, torch.Tensor], model: nn.Module,
                              source: str) -> dict[str, torch.Tensor]:
    """The file layout -> tensors by this model's parameter names (experts stacked again)."""
    config: MixLoraConfig = model.mixlora_config
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    expert_rows: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name = _model_name_for(key, config)
        if name is None:
            raise AdapterError(f"{source}: unexpected tensor {key!r} for a {config.peft_type} adapter")
        if isinstance(name, tuple):
            stacked, j = name
            expert_rows.setdefault(stacked, {})[j] = tensor
        else:
            out[name] = tensor
    for stacked, rows in expert_rows.items():
        n = params[stacked].shape[0] if stacked in params else len(rows)
        missing = [j for j in range(n) if j not in rows]
        if missing:
            raise AdapterError(f"{source}: experts {missing} missing for {stacked}")
        out[stacked] = torch.stack([rows[j] for j in range(n)])
    unknown = sorted(set(out) - set(params))
    if unknown:
        raise AdapterError(f"{source}: tensors for modules this model lacks: {unknown[:5]}")
    # DoRA magnitudes are optional in files written by the reference (it drops them).
    missing = sorted(n for n in expected - set(out) if not n.endswith("lora_magnitude_vector"))
    if missing:
        raise AdapterError(f"{source}: missing tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, tensor in out.items():
        if tuple(tensor.shape) != tuple(_full_shape(params[name])):
            raise AdapterError(
                f"{source}: tensor for {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(_full_shape(params[name]))} (an adapter for another model size or rank?)"
            )
    return out


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _model_name_for(key: str, config: MixLoraConfig):
    """This model's parameter name for a file key; (stacked name, expert index) for an expert's row."""
    if not config.is_mixlora:
        return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else None
    m = _MIXLORA_LAYER.fullmatch(key)
    if m is None:
        return None
    layer, rest = m.groups()
    base = f"model.layers.{layer}."
    t = parse_tensor_key(key)
    if t is not None and t.kind == "router":
        return base + "mlp.router.weight"
    if t is not None and t.expert is not None:
        return (base + f"mlp.experts.{t.proj}.{t.kind}", t.expert)
    return base + rest


# ------------------------------------------------------------------------------------ config I/O
def _peft_config_dict(config: MixLoraConfig) -> dict:
    """PEFT's ``LoraConfig`` keys for a plain LoRA / DoRA baseline."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.base_model_name_or_path or "",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(config.target_modules),
        "bias": "none",
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
        "init_lora_weights": "gaussian" if config.lora_init == "gaussian" else True,
    }


_PEFT_KEYS_USED = {"peft_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
                   "bias", "use_dora", "use_rslora"}


def read_adapter_config(adapter_dir: str | os.PathLike) -> MixLoraConfig:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: adapter config not found (is {adapter_dir} an adapter directory?)")
    d = load_json(path, AdapterError)
    if isinstance(d, dict) and d.get("peft_type") == "LORA":
        init = d.get("init_lora_weights", True)
        d = {k: v for k, v in d.items() if k in _PEFT_KEYS_USED}
        d["lora_init"] = "gaussian" if init == "gaussian" else "original"
    try:
        return MixLoraConfig.from_dict(d, source=str(path))
    except ConfigError as e:
        raise AdapterError(str(e)) from None


# --------------------------------------------------------------------------------- save and load
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapter tensors in file layout (gathering ZeRO-3 shards: call on every rank)."""
    config = _config_of(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with gathered(list(named.values())):
        return to_reference_state_dict(named, config)


def write_adapter(out_dir: str | os.PathLike, config: MixLoraConfig, weights: dict[str, torch.Tensor]) -> None:
    """Write config + both weight files; the directory appears complete or not at all."""
    from safetensors.torch import save_file

    if not weights:
        raise AdapterError(f"{out_dir}: refusing to write an adapter with no tensors")
    config_dict = config.to_dict() if config.is_mixlora else _peft_config_dict(config)
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
        torch.save(weights, tmp / BIN_NAME)
        save_file(weights, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})


def save_mixlora_adapter(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Save the adapter of ``model`` (config + weights) to ``out_dir``."""
    write_adapter(out_dir, _config_of(model), adapter_state_dict(model))


def adapter_weights_file(adapter_dir: str | os.PathLike) -> Path:
    """The weights file that is read: safetensors when there is one, else the ``.bin``."""
    adapter_dir = Path(adapter_dir)
    for path in (adapter_dir / SAFETENSORS_NAME, adapter_dir / BIN_NAME):
        if path.is_file():
            return path
    raise AdapterError(f"{adapter_dir}: no {SAFETENSORS_NAME} or {BIN_NAME} found")


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = adapter_weights_file(adapter_dir)
    if path.name == SAFETENSORS_NAME:
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_mixlora_adapter(model: nn.Module, adapter_dir: str | os.PathLike, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Inject the adapter saved in ``adapter_dir`` into a plain HF model and load its weights.

    Accepts directories written here, by the reference ``mixlora``/MoE-PEFT, legacy m-LoRA key
    names, and PEFT LoRA/DoRA adapters. Returns ``model``.
    """
    config = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    if getattr(model, "mixlora_config", None) is None:
        inject_mixlora(model, config, adapter_dtype)
    load_adapter_weights(model, weights, source=str(adapter_dir))
    return model


@torch.no_grad()
def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "adapter") -> None:
    values = from_reference_state_dict(weights, model, source)
    params = dict(model.named_parameters())
    for name, value in values.items():
        param = params[name]
        with gathered([param], modifier_rank=0):
            param.copy_(value.to(param.dtype))


def _config_of(model: nn.Module) -> MixLoraConfig:
    config = getattr(model, "mixlora_config", None)
    if config is None:
        raise ValueError("model carries no MixLoRA adapter: call inject_mixlora or load_mixlora_adapter first")
    if getattr(model, "mixlora_merged", False):
        raise ValueError("this model's LoRA layers were merged into its weights for inference; save the adapter "
                         "from an unmerged model")
    return config
