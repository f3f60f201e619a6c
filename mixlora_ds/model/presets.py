"""Named model configs (presets) and base models with random weights drawn from a config.

A model config is a preset name such as "tiny", a config.json (or a model directory holding one), a
training run YAML (its ``model.config``) or a mapping with ``model_type``. Weights are drawn from a
seed, so the same config and seed always give the same base: an adapter trained on such a base can
be evaluated later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from mixlora_ds.utils.jsonfile import load_json

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The project's embedded default: tiny enough for CPU tests, LLaMA-shaped (GQA, SwiGLU). The same
    # model as configs/tiny.yaml's model.config (a test holds them equal), initializer_range included.
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.2,
    ),
    # LLaMA-2-7B's shapes, for benchmarks with random weights.
    "llama2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}


def model_config_from(spec: str | os.PathLike | Mapping[str, Any], **overrides: Any):
    """A transformers config from a preset name, a config.json path (or model directory), a training
    run YAML (its ``model.config``) or a mapping with ``model_type``."""
    from transformers import AutoConfig

    if isinstance(spec, (str, os.PathLike)) and str(spec) in MODEL_PRESETS:
        d = dict(MODEL_PRESETS[str(spec)])
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).suffix in (".yaml", ".yml"):
        return model_config_from(run_model_config(spec), **overrides)
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model config {spec!r} is neither a preset {sorted(MODEL_PRESETS)} nor a file")
        d = load_json(path, ValueError)
    else:
        d = dict(spec)
    d.update({k: v for k, v in overrides.items() if v is not None})
    if "model_type" not in d:
        raise ValueError(f"model config {spec!r}: field 'model_type' is required")
    model_type = d.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise ValueError(f"model config {spec!r}: {e}") from None


def run_model_config(path: str | os.PathLike) -> Mapping[str, Any] | str:
    """The ``model.config`` of a training run YAML: a mapping, or the path of a config.json.

    Only that key is read: the run's other sections are training's to check (``mixlora_ds.train``,
    which the model code does not import).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: run config file not found")
    try:
        run = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    model = run.get("model") if isinstance(run, dict) else None
    model = model if isinstance(model, dict) else {}
    config = model.get("config")
    if config is None:
        raise ValueError(f"{path}: model.config is not set (this run loads {model.get('name_or_path')!r})")
    if not isinstance(config, (dict, str)):
        raise ValueError(f"{path}: 'model.config' must be a mapping or a config.json path, got {config!r}")
    return config


def build_model_from_config(
    spec: str | os.PathLike | Mapping[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **overrides: Any,
):
    """A causal LM with random weights. Weights are drawn in fp32 on the CPU from ``seed`` and only then
    cast and moved, so the same config and seed give the same base on every machine and dtype."""
    from transformers import AutoModelForCausalLM

    config = model_config_from(spec, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device=device, dtype=dtype)
