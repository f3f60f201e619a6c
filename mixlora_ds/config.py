"""Adapter configuration: one dataclass that round-trips through ``adapter_config.json``.

The field names and JSON keys follow the reference MixLoRA format (``mixlora`` 0.2.3 / MoE-PEFT), so an
adapter written here loads there and vice versa. Unlike the reference, the router hyper-parameters
(aux-loss coefficient, init range, jitter, ...) are written too, so a resumed run does not silently fall
back to defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from mixlora_ds.utils.jsonfile import load_json

PEFT_TYPES = ("MIXLORA", "LORA")
ROUTING_STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")
LEGACY_ROUTING_STRATEGIES = {"mixtral": "mixlora"}
TASK_TYPES = ("CAUSAL_LM", "QUESTION_ANS")
LORA_INITS = ("original", "gaussian")
EXPERT_LORA_KEYS = ("bias", "r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora")

# Defaults that depend on the routing strategy (MoE-PEFT's choices); None in the dataclass means
# "take the strategy default".
_STRATEGY_DEFAULTS = {
    "mixlora": {"router_init_range": 0.02, "jitter_noise": 0.0},
    "mixlora-dynamic": {"router_init_range": 0.02, "jitter_noise": 0.0},
    "mixlora-switch": {"router_init_range": 1.0, "jitter_noise": 0.01},
}


class ConfigError(ValueError):
    """An invalid adapter configuration; the message names the offending field (and file).

    ``field`` is that field's name (dotted inside ``expert_lora``), or None when the error is about
    no single field (unknown or missing fields, a file that is not a JSON object)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class MixLoraConfig:
    """A MixLoRA adapter (``peft_type="MIXLORA"``) or a plain LoRA / DoRA baseline (``"LORA"``)."""

    r: int = 8
    """LoRA rank of the attention LoRAs (and of the experts unless ``expert_lora`` overrides it)."""
    lora_alpha: int = 16
    """LoRA scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with rsLoRA). An int, as the format requires."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input only; off in eval mode. The reference refuses 0 when loading."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Projection names to adapt. A ``{name: bool}`` dict is accepted too (legacy files)."""
    peft_type: str = "MIXLORA"
    """"MIXLORA" (experts on the FFN) or "LORA" (plain LoRA/DoRA on every target, PEFT layout)."""
    routing_strategy: str = "mixlora"
    """"mixlora" (top-k), "mixlora-dynamic" (top-p) or "mixlora-switch" (top-1 with capacity)."""
    num_experts: int = 8
    top_k: int = 2
    """Experts per token for "mixlora"."""
    top_p: float = 0.8
    """Probability mass kept by "mixlora-dynamic"."""
    temperature: float = 0.0
    """"mixlora-dynamic": router logits are divided by this before the softmax when > 0."""
    renormalize_top_p: bool = True
    """"mixlora-dynamic": renormalise the kept weights to sum to 1 (MoE-PEFT does not; set False to
    reproduce adapters trained there). Not a reference key."""
    expert_capacity: int = 32
    """"mixlora-switch": tokens per expert per sequence in training; extra tokens pass through."""
    ffn_dropout: float = 0.0
    """"mixlora-switch": dropout on the expert output in training."""
    act_fn: str | None = None
    """FFN activation; None = the base model's ``hidden_act``. Always written (the reference needs it)."""
    use_dora: bool = False
    use_rslora: bool = False
    lora_init: str = "original"
    """"original" (kaiming-uniform A) or "gaussian" (A ~ N(0, 1/r))."""
    expert_lora: dict[str, Any] | None = None
    """Overrides for the expert LoRAs: any of bias, r, lora_alpha, lora_dropout, use_dora, use_rslora."""
    router_aux_loss_coef: float = 0.001
    router_loss: bool = True
    """Add the load-balance loss (and z-loss for switch) to the training loss."""
    router_init_range: float | None = None
    """Std of the normal init of the router weight; None = strategy default (0.02; 1.0 for switch)."""
    jitter_noise: float | None = None
    """Multiplicative U(1-eps, 1+eps) noise on the MoE input in training; None = strategy default."""
    router_z_loss_coef: float = 0.001
    """"mixlora-switch" only."""
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, dict):
            self.target_modules = [name for name, on in self.target_modules.items() if on]
        self.routing_strategy = LEGACY_ROUTING_STRATEGIES.get(self.routing_strategy, self.routing_strategy)
        defaults = _STRATEGY_DEFAULTS.get(self.routing_strategy, {})
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()

    # ----------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"adapter config field '{name}': {message}", field=name)

        need(self.peft_type in PEFT_TYPES, "peft_type", f"must be one of {PEFT_TYPES}, got {self.peft_type!r}")
        _check_lora_fields(need, "", self.r, self.lora_alpha, self.lora_dropout)
        need(isinstance(self.use_dora, bool), "use_dora", "must be a bool")
        need(isinstance(self.use_rslora, bool), "use_rslora", "must be a bool")
        need(self.lora_init in LORA_INITS, "lora_init", f"must be one of {LORA_INITS}")
        need(self.bias == "none", "bias", "only 'none' is supported")
        need(
            isinstance(self.target_modules, list)
            and len(self.target_modules) > 0
            and all(isinstance(t, str) and t for t in self.target_modules),
            "target_modules",
            "must be a non-empty list of projection names",
        )
        need(self.task_type in TASK_TYPES, "task_type", f"must be one of {TASK_TYPES}, got {self.task_type!r}")
        need(
            self.act_fn is None or isinstance(self.act_fn, str), "act_fn", "must be an activation name or null"
        )
        if self.peft_type == "LORA":
            return
        need(
            self.routing_strategy in ROUTING_STRATEGIES,
            "routing_strategy",
            f"must be one of {ROUTING_STRATEGIES} (or legacy 'mixtral'), got {self.routing_strategy!r}",
        )
        need(_is_int(self.num_experts) and self.num_experts >= 1, "num_experts", "must be an int >= 1")
        need(_is_int(self.top_k) and self.top_k >= 1, "top_k", "must be an int >= 1")
        need(
            self.top_k <= self.num_experts,
            "top_k",
            f"top_k={self.top_k} exceeds num_experts={self.num_experts}",
        )
        need(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(_is_number(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        need(_is_int(self.expert_capacity) and self.expert_capacity >= 1, "expert_capacity", "must be an int >= 1")
        need(_is_number(self.ffn_dropout) and 0 <= self.ffn_dropout < 1, "ffn_dropout", "must be in [0, 1)")
        need(
            _is_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0,
            "router_aux_loss_coef",
            "must be a number >= 0",
        )
        need(isinstance(self.router_loss, bool), "router_loss", "must be a bool")
        need(
            _is_number(self.router_init_range) and self.router_init_range >= 0,
            "router_init_range",
            "must be a number >= 0",
        )
        need(
            _is_number(self.jitter_noise) and 0 <= self.jitter_noise < 1, "jitter_noise", "must be in [0, 1)"
        )
        need(
            _is_number(self.router_z_loss_coef) and self.router_z_loss_coef >= 0,
            "router_z_loss_coef",
            "must be a number >= 0",
        )
        if self.expert_lora is not None:
            need(isinstance(self.expert_lora, dict), "expert_lora", "must be an object")
            unknown = sorted(set(self.expert_lora) - set(EXPERT_LORA_KEYS))
            need(not unknown, "expert_lora", f"unknown keys {unknown}; allowed {list(EXPERT_LORA_KEYS)}")
            e = self.expert_settings()
            _check_lora_fields(need, "expert_lora.", e.r, e.lora_alpha, e.lora_dropout)

    # ------------------------------------------------------------------------------- derived values
    @property
    def is_mixlora(self) -> bool:
        return self.peft_type == "MIXLORA"

    def attention_settings(self) -> "LoraSettings":
        return LoraSettings(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.use_dora, self.lora_init)

    def expert_settings(self) -> "LoraSettings":
        o = self.expert_lora or {}
        return LoraSettings(
            o.get("r", self.r),
            o.get("lora_alpha", self.lora_alpha),
            o.get("lora_dropout", self.lora_dropout),
            o.get("use_rslora", self.use_rslora),
            o.get("use_dora", self.use_dora),
            self.lora_init,
        )

    # --------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content. Keys the reference needs are always present."""
        d: dict[str, Any] = {
            "bias": self.bias,
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path or "",  # the reference requires a string
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": list(self.target_modules),
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "lora_init": self.lora_init,
        }
        if self.is_mixlora:
            d.update(
                routing_strategy=self.routing_strategy,
                num_experts=self.num_experts,
                act_fn=self.act_fn,
                top_k=self.top_k,
                top_p=self.top_p,
                temperature=self.temperature,
                renormalize_top_p=self.renormalize_top_p,
                expert_capacity=self.expert_capacity,
                ffn_dropout=self.ffn_dropout,
                router_aux_loss_coef=self.router_aux_loss_coef,
                router_loss=self.router_loss,
                router_init_range=self.router_init_range,
                jitter_noise=self.jitter_noise,
                router_z_loss_coef=self.router_z_loss_coef,
            )
            if self.expert_lora is not None:
                d["expert_lora"] = dict(self.expert_lora)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "adapter config") -> "MixLoraConfig":
        """Build from an ``adapter_config.json`` dict (reference, legacy or our own)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys other tools write that carry no meaning here (PEFT/MoE-PEFT bookkeeping).
        ignored = {"sparse_step", "inference_mode", "revision", "modules_to_save", "fan_in_fan_out", "name"}
        unknown = sorted(set(d) - known - ignored)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}")
        missing = [k for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k not in d]
        if d.get("peft_type", "MIXLORA") == "MIXLORA":
            missing += [k for k in ("num_experts",) if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}")
        nullable = {"act_fn", "base_model_name_or_path", "expert_lora"}
        kwargs = {k: v for k, v in d.items() if k in known and (v is not None or k in nullable)}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}", field=e.field) from None

    def to_json(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file renamed over the target."""
        from mixlora_ds.utils.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MixLoraConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "adapter_config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: adapter config not found")
        return cls.from_dict(load_json(path, ConfigError), source=path)


@dataclass(frozen=True)
class LoraSettings:
    """Resolved hyper-parameters of one family of LoRA modules (attention, or the experts)."""

    r: int
    lora_alpha: int
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    init: str

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_lora_fields(need, prefix: str, r: Any, alpha: Any, dropout: Any) -> None:
    need(_is_int(r) and r > 0, f"{prefix}r", f"must be an int > 0, got {r!r}")
    need(
        _is_int(alpha) and alpha > 0,
        f"{prefix}lora_alpha",
        f"must be an int > 0 (the adapter format stores an int), got {alpha!r}",
    )
    need(
        _is_number(dropout) and 0.0 <= dropout < 1.0, f"{prefix}lora_dropout", f"must be in [0, 1), got {dropout!r}"
    )
