"""What the run config says about the frozen base, learned without building it: its Transformers
config, whether the adapter's targets are among its linear layers, and whether a starting adapter
(``model.init_adapter``) fits it.

These belong to the run plan: every rank learns them from files alone (nothing is downloaded) before
any communication. The checks use the model's skeleton on the meta device, which takes no
memory and a second or two even for 7B.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn as nn

from mixlora_ds.train.config import TrainConfig


def hf_config_for(cfg: TrainConfig):
    """The Transformers config of the base model, from a local directory or the run file."""
    from transformers import AutoConfig

    m = cfg.model
    if m.name_or_path:
        path = m.name_or_path
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise cfg.error("model.name_or_path", f"model.name_or_path={path!r} is not a local model directory "
                                                  f"with a config.json (nothing is downloaded)")
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=m.trust_remote_code)
    if m.config is None:
        raise cfg.error("model", "give model.name_or_path or model.config")
    if isinstance(m.config, str):
        if not os.path.isfile(m.config):
            raise cfg.error("model.config", f"model.config file {m.config!r} not found")
        with open(m.config, encoding="utf-8") as f:
            d = json.load(f)
    else:
        d = dict(m.config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise cfg.error("model.config", "model.config needs a 'model_type' (e.g. llama)")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, TypeError) as e:
        raise cfg.error("model.config", str(e)) from None


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


def model_skeleton(hf_config) -> nn.Module:
    """The base model on the meta device: module names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with plain_construction(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def check_adapter_targets(cfg: TrainConfig, skeleton: nn.Module) -> None:
    """Fail before any heavy work when the adapter targets projections the model does not have."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, mod in skeleton.named_modules() if isinstance(mod, nn.Linear)}
    missing = [t for t in cfg.adapter.target_modules if t not in leaf_names]
    if missing:
        raise cfg.error("adapter.target_modules", f"adapter.target_modules {missing} not found in the "
                                                  f"{skeleton.config.model_type} model; its linear layers are "
                                                  f"{sorted(leaf_names)}")


def check_init_adapter(cfg: TrainConfig, skeleton: nn.Module) -> None:
    """``model.init_adapter`` describes the run's adapter (what decides its weights' meaning), and its
    tensors fit the base (layers, shapes, ranks, router width)."""
    path = cfg.model.init_adapter
    if path is None:
        return
    from mixlora_ds.adapter_check import check_adapter
    from mixlora_ds.adapter_io import AdapterError

    key = "model.init_adapter"
    try:
        saved = check_adapter(skeleton, path)
    except AdapterError as e:
        raise cfg.error(key, f"{key}={path!r}: {e}") from None
    ours, theirs = cfg.adapter, saved
    fields = ["peft_type", "target_modules"]
    if ours.is_mixlora:
        fields += ["num_experts", "top_k", "routing_strategy"]
    for name in fields:
        a, b = getattr(ours, name), getattr(theirs, name)
        if name == "target_modules":
            a, b = sorted(a), sorted(b)
        if a != b:
            raise cfg.error(key, f"{key}={path!r} has {name}={b!r}, the run's adapter.{name} is {a!r}; they must "
                                 f"describe the same adapter")
    # Rank, alpha and the LoRA variant decide what the weights mean (dropout and init do not).
    for part, settings in (("attention", "attention_settings"), ("expert", "expert_settings")):
        a, b = getattr(ours, settings)(), getattr(theirs, settings)()
        for name in ("r", "lora_alpha", "use_rslora", "use_dora"):
            if getattr(a, name) != getattr(b, name):
                raise cfg.error(key, f"{key}={path!r} has {part} {name}={getattr(b, name)!r}, the run's adapter "
                                     f"has {getattr(a, name)!r}; they must describe the same adapter")
