"""The training run's schema: documented dataclasses loaded from YAML, with command-line overrides.

A run file has these sections (every key is optional unless marked; see ``configs/tiny.yaml``)::

    run_name, output_dir, seed, precision, max_steps, gc_every_steps
    model:      where the frozen base comes from (a local Hugging Face dir, or a config with random weights)
    adapter:    a MixLoRA config, or a LoRA/DoRA baseline (a ``mixlora_ds.MixLoraConfig``)
    data:       prepared shard directories (``data_prep/prepare.py`` output)
    batch:      micro-batch per rank and global batch (gradient accumulation follows)
    optim:      AdamW hyper-parameters and gradient clipping
    schedule:   warmup, then constant / cosine / linear decay
    checkpoint: DeepSpeed checkpoints, keep-last-K, adapter export
    logging:    TensorBoard, console cadence, peak FLOPs for MFU
    eval:       periodic held-out loss
    deepspeed:  DeepSpeed JSON path plus overrides, and who shards the frozen base under ZeRO-3
    parallel:   expert parallelism (MixLoRA experts shared out over ranks)

Each section checks its own fields when it is made (``__post_init__``, beside the fields), so a
loaded config is a valid one; checks that need the world size, the data or the model are the run
plan's (``mixlora_ds.train.plan``). Errors name the file and line (or the command-line flag) and the
dotted key. Schema version 1.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mixlora_ds.config import ConfigError, MixLoraConfig

SCHEMA_VERSION = 1


class TrainConfigError(ValueError):
    """An invalid run configuration; the message names where (file:line or flag) and which key.

    ``key`` is that dotted key, or None when the error is about no single key (the file itself)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class FieldError(ValueError):
    """A section's field holds a value outside its range. A section's ``__post_init__`` knows the
    field but neither its section's dotted name nor where it was written: the loader adds both and
    raises a ``TrainConfigError``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"'{name}' {problem}")
        self.field = name
        self.problem = problem


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise FieldError(name, problem)


def _require_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise FieldError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ModelSection:
    name_or_path: str | None = None
    """Local Hugging Face model directory (config.json + safetensors). Loaded sharded under ZeRO-3."""
    config: dict[str, Any] | str | None = None
    """Used when ``name_or_path`` is null: a transformers config as a mapping (``model_type`` required)
    or a path to a config.json. The base then gets random weights (seeded by ``seed``)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``name_or_path``, else the one the data manifest names."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    """"sdpa" or "eager" use the block-diagonal packed mask; "flash_attention_2" uses position ids (varlen)."""
    gradient_checkpointing: bool = True
    """Non-reentrant activation checkpointing of every decoder layer."""
    compile: bool = False
    """torch.compile every decoder layer's forward (one graph, reused by all layers). Without it the
    step is bound by host-side launch work, which compiling removes (BENCHMARKS.md, "The host is the
    bottleneck"). Any ZeRO stage, except ZeRO-3 with ``deepspeed.zero3_impl: deepspeed``, whose
    parameter hooks run inside the layers."""
    cuda_graphs: bool = False
    """With ``compile``: replay each compiled layer's forward and backward as CUDA graphs
    (``torch.compile`` mode "reduce-overhead"), so the host launches a layer's kernels at once; for
    small micro-batches, where the compiled step still waits on the host (BENCHMARKS.md, "CUDA
    graphs for the compiled layers"; not yet measured on a GPU, hence off). CUDA only; not with
    ZeRO-3, activation checkpointing or expert parallelism (weights regathered into new memory,
    recomputed layers and data-dependent all-to-all sizes do not replay)."""
    trust_remote_code: bool = False
    init_adapter: str | None = None
    """An adapter directory (reference format, e.g. an earlier run's ``adapter``) to start from
    instead of a fresh initialisation: its config must describe the same adapter as ``adapter``
    (type, rank, alpha, experts, routing, targets). Under expert parallelism each rank takes its own
    experts from it. Optimizer state starts fresh; to continue a run exactly, resume its checkpoint."""

    def __post_init__(self) -> None:
        if self.cuda_graphs:
            _require(self.compile, "cuda_graphs", "needs model.compile: true (the graphs are the compiled layers')")
            _require(not self.gradient_checkpointing, "cuda_graphs",
                     "does not work with model.gradient_checkpointing: true (a recomputed layer does not "
                     "replay); turn one of them off")


@dataclass
class DataSection:
    train_dir: str = ""
    """Directory written by ``data_prep/prepare.py`` (manifest.json + shards). Required."""
    eval_dir: str | None = None
    """Held-out shards; null = the ``eval_split`` of ``train_dir`` when it has one."""
    train_split: str = "train"
    eval_split: str = "eval"
    shuffle: bool = True
    drop_last: bool = True
    allow_tokenizer_mismatch: bool = False
    """Train although the data was prepared with a tokenizer other than the model's (``model.tokenizer``
    or the one saved in ``model.name_or_path``); refused by default, since the ids then mean other
    words. Token ids past the model's vocabulary are refused either way."""


@dataclass
class BatchSection:
    micro_batch_size: int = 1
    """Packed sequences per rank per forward."""
    global_batch_size: int = 8
    """Packed sequences per optimizer step over all ranks: micro x accumulation x world size."""

    def __post_init__(self) -> None:
        _require_positive("micro_batch_size", self.micro_batch_size)
        _require_positive("global_batch_size", self.global_batch_size)


@dataclass
class OptimSection:
    lr: float = 2e-4
    weight_decay: float = 0.01
    """Applied to every trainable tensor, router included (the reference does the same)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Global L2 clipping over all ranks; 0 disables it."""
    impl: Literal["torch", "fused", "cpu_adam"] = "torch"
    """"torch": torch.optim.AdamW (nothing to compile; right for LoRA-sized state). "fused":
    DeepSpeed FusedAdam (GPU). "cpu_adam": DeepSpeedCPUAdam for optimizer offload. The last two
    JIT-compile a kernel on first use."""

    def __post_init__(self) -> None:
        _require_positive("lr", self.lr)
        _require_positive("weight_decay", self.weight_decay, allow_zero=True)
        _require_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 "must be two numbers in [0, 1)")


@dataclass
class ScheduleSection:
    type: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Used when ``warmup_steps`` is 0: a fraction of the total optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine / linear decay end at ``lr * min_lr_ratio``."""
    num_epochs: float = 1.0
    """Total length when ``max_steps`` is null."""

    def __post_init__(self) -> None:
        _require_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        _require_positive("num_epochs", self.num_epochs)


@dataclass
class CheckpointSection:
    dir: str | None = None
    """Null = ``<output_dir>/checkpoints``."""
    every_steps: int = 0
    """Save every N optimizer steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    save_final: bool = True
    export_dir: str | None = None
    """Where the final adapter (reference format) goes; null = ``<output_dir>/adapter``."""
    resume: str | None = None
    """"auto" (latest complete checkpoint, if any), a checkpoint directory, or null."""

    def __post_init__(self) -> None:
        _require_positive("every_steps", self.every_steps, allow_zero=True)
        _require_positive("keep_last", self.keep_last)


@dataclass
class LoggingSection:
    tensorboard_dir: str | None = None
    """Null = ``<output_dir>/tensorboard``."""
    every_steps: int = 10
    """Console line and TensorBoard scalars every N optimizer steps."""
    heatmap_every_steps: int = 50
    """Expert-load heatmap image every N steps (0 = never)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device in the training precision; enables the MFU scalar."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _require_positive("every_steps", self.every_steps)
        if self.peak_tflops is not None:
            _require_positive("peak_tflops", self.peak_tflops)


@dataclass
class EvalSection:
    every_steps: int = 0
    """Held-out loss every N optimizer steps (0 = only at the end when eval data exists)."""
    max_batches: int | None = None
    """Per-rank cap on evaluation micro-batches; null = the whole held-out split."""
    at_end: bool = True

    def __post_init__(self) -> None:
        _require_positive("every_steps", self.every_steps, allow_zero=True)


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero3_cpu.json"
    """DeepSpeed JSON; relative paths are taken from the run file's directory, then the CWD."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Nested keys merged over the JSON, e.g. ``{zero_optimization: {stage: 2}}``."""
    timeout_minutes: float | None = None
    """Collective timeout; null = DEEPSPEED_TIMEOUT or DeepSpeed's default (10)."""
    zero3_impl: Literal["mixlora_ds", "deepspeed"] = "mixlora_ds"
    """Who shards the frozen base under ZeRO-3 (a DeepSpeed config of stage 3). "mixlora_ds": each
    decoder layer's frozen weights become one flat buffer split across ranks, gathered ahead of use
    (``zero3_gather_transport``, ``zero3_prefetch_layers``; ``mixlora_ds.parallel``); DeepSpeed's
    engine then runs stage 2 for the trainable adapter (its gradients and optimizer state
    partitioned, the adapter itself replicated). Its hooks sit outside the layers, so it works with
    ``model.compile``, which "deepspeed" cannot have: the faster of the two (BENCHMARKS.md, "ZeRO-3
    with the frozen base sharded by mixlora_ds"). The stage-3-only keys of the DeepSpeed config are
    not used; parameter offload, NVMe or partial optimizer offload and quantized weights or gradients
    are refused. "deepspeed":
    DeepSpeed's own stage-3 engine (gathers from hooks on every module; partitions the adapter too
    when it is larger than ``stage3_param_persistence_threshold``)."""
    zero3_gather_transport: Literal["auto", "copy_engine", "nccl"] = "auto"
    """With ``zero3_impl: mixlora_ds``, how layers are gathered. "copy_engine": the shards in
    symmetric memory, each rank copying the others' with the GPU's copy engines, no SMs and no
    collective (CUDA, one host; faster than "nccl" there, BENCHMARKS.md, "ZeRO-3 gathers by copy
    engine"); "nccl": an all-gather (any backend, any hosts); "auto": "copy_engine" where it works,
    else "nccl"."""
    zero3_prefetch_layers: int = 1
    """With ``zero3_impl: mixlora_ds``, how many decoder layers ahead of use a layer's gather starts
    (0: when the layer is reached). Each layer more keeps one more layer's frozen weights gathered
    at a time (0.4 GB at 7B, bf16). The first this many layers stay gathered between steps, for the
    next forward (with as many as the model has, the whole base stays gathered)."""
    zero3_gather: Literal["layer", "module"] = "layer"
    """With ``zero3_impl: deepspeed``, the gather granularity. "layer": each decoder layer is one ZeRO-3
    leaf, its frozen weights gathered in one go (fewer, larger gathers: faster than "module",
    BENCHMARKS.md, "Earlier levers: how ZeRO-3 gathers"). "module": DeepSpeed's per-module gathers
    (the MoE block still one leaf)."""

    def __post_init__(self) -> None:
        _require_positive("zero3_prefetch_layers", self.zero3_prefetch_layers, allow_zero=True)


@dataclass
class ParallelSection:
    expert_parallel_size: int = 1
    """Ranks that share out each layer's MixLoRA experts (1: off). Each rank of an expert-parallel
    group of this many consecutive ranks owns ``num_experts / expert_parallel_size`` experts and
    tokens travel to them by all-to-all; must divide ``adapter.num_experts`` and the world size.
    Pays only when replicated experts are many or large: see README, "Expert parallelism", and the
    estimate the training log prints at start."""

    def __post_init__(self) -> None:
        _require(self.expert_parallel_size >= 1, "expert_parallel_size",
                 f"must be >= 1 (1 = off), got {self.expert_parallel_size}")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: MixLoraConfig = field(default_factory=MixLoraConfig)
    """The adapter; its fields check themselves, by the adapter format's rules (``MixLoraConfig``)."""
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run_name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """"auto": bf16 on GPUs, fp32 on CPU. Adapter weights and optimizer state are always fp32."""
    max_steps: int | None = None
    """Optimizer steps to run; null = ``schedule.num_epochs`` over the training shards."""
    gc_every_steps: int = 50
    """Python garbage collection every N optimizer steps, on all ranks at once, instead of CPython's
    automatic collector, whose pauses fall on different steps on different ranks (0 = automatic)."""
    schema_version: int = SCHEMA_VERSION

    origin: Origins = field(default_factory=lambda: Origins("<defaults>"), repr=False, compare=False)
    """Where each key was given (not part of the schema): errors found after loading name it."""

    def __post_init__(self) -> None:
        if self.max_steps is not None:
            _require_positive("max_steps", self.max_steps)

    @property
    def source(self) -> str:
        """The run file, or "<defaults>"."""
        return self.origin.source

    def where(self, key: str) -> str:
        """"file:line" (or the command-line flag) of a dotted key, else of its nearest section."""
        return self.origin(key)

    def error(self, key: str, message: str) -> TrainConfigError:
        """An error about ``key``, placed where the key was given."""
        return TrainConfigError(f"{self.where(key)}: {message}", key=key)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("origin")
        return d

    def resolve_path(self, p: str | None) -> str | None:
        """Paths in a run file are relative to the current directory (the project root in practice)."""
        return None if p is None else os.path.abspath(os.path.expanduser(p))

    @property
    def checkpoint_dir(self) -> str:
        return self.resolve_path(self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints"))

    @property
    def export_dir(self) -> str:
        return self.resolve_path(self.checkpoint.export_dir or os.path.join(self.output_dir, "adapter"))

    @property
    def tensorboard_dir(self) -> str:
        return self.resolve_path(self.logging.tensorboard_dir or os.path.join(self.output_dir, "tensorboard"))


# ----------------------------------------------------------------------------------- YAML + marks
class Origins:
    """Maps dotted keys to "file:line" (or the command-line flag) for error messages."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[str, int] = {}
        self.flags: dict[str, str] = {}

    def __call__(self, dotted: str) -> str:
        if dotted in self.flags:
            return f"command line {self.flags[dotted]}"
        probe = dotted
        while probe:
            if probe in self.lines:
                return f"{self.source}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return self.source


def _record_lines(node: yaml.Node, prefix: str, where: Origins) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            where.lines[key] = key_node.start_mark.line + 1
            _record_lines(value_node, key, where)


def _load_yaml(path: str) -> tuple[dict[str, Any], Origins]:
    where = Origins(path)
    if not os.path.isfile(path):
        raise TrainConfigError(f"{path}: run config file not found")
    text = Path(path).read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TrainConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: the run config must be a mapping at the top level")
    if node is not None:
        _record_lines(node, "", where)
    return data, where


def parse_overrides(argv: list[str]) -> list[tuple[str, Any, str]]:
    """``--section.key value`` / ``--section.key=value`` pairs; values parse as YAML scalars/lists."""
    out: list[tuple[str, Any, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise TrainConfigError(f"command line: expected --section.key VALUE, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise TrainConfigError(f"command line {arg}: missing value")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.replace("-", "_"), value, f"--{key}"))
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


# ------------------------------------------------------------------------------------ type checks
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: Origins) -> Any:
    """Check ``value`` against annotation ``tp``; return it (floats widened from ints)."""
    origin = typing.get_origin(tp)
    bad = TrainConfigError(
        f"{where(key)}: '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}", key=key
    )
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, where)
            except TrainConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "2e-4" (no dot) as a string; accept what is clearly a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is MixLoraConfig:
        if not isinstance(value, dict):
            raise bad
        return _build_adapter(value, key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, where)
    raise bad


def _build(cls: type, data: dict[str, Any], prefix: str, where: Origins, **not_schema: Any) -> Any:
    """A section from its mapping: each key known and of its annotated type, then the section's own
    checks (``FieldError``), every error placed by ``where``."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "origin"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            section = f"section '{prefix}'" if prefix else "the top level"
            raise TrainConfigError(
                f"{where(dotted)}: unknown key '{dotted}' in {section}; known keys: {', '.join(sorted(known))}",
                key=dotted)
        kwargs[key] = _coerce(value, hints[key], dotted, where)
    try:
        return cls(**kwargs, **not_schema)
    except FieldError as e:
        dotted = f"{prefix}.{e.field}" if prefix else e.field
        raise TrainConfigError(f"{where(dotted)}: '{dotted}' {e.problem}", key=dotted) from None


def _build_adapter(data: dict[str, Any], key: str, where: Origins) -> MixLoraConfig:
    """The adapter section: ``MixLoraConfig`` checks its fields itself, by the adapter format's rules
    (which accept more than the annotations say, e.g. legacy ``{name: bool}`` target modules)."""
    known = {f.name for f in dataclasses.fields(MixLoraConfig)}
    for name in data:
        if name not in known:
            dotted = f"{key}.{name}"
            raise TrainConfigError(f"{where(dotted)}: unknown key '{dotted}' in section '{key}'; known keys: "
                                   f"{', '.join(sorted(known))}", key=dotted)
    try:
        return MixLoraConfig(**data)
    except ConfigError as e:
        dotted = f"{key}.{e.field}" if e.field else key
        raise TrainConfigError(f"{where(dotted)}: {e}", key=dotted) from None


# --------------------------------------------------------------------------------------- loading
def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a run file (or only defaults when ``path`` is None) and apply ``--a.b value`` overrides.
    The result is checked field by field; a bad value raises ``TrainConfigError``."""
    data, origins = _load_yaml(path) if path else ({}, Origins("<defaults>"))
    for dotted, value, flag in parse_overrides(overrides or []):
        _set_dotted(data, dotted, value)
        origins.flags[dotted] = flag
    cfg = _build(TrainConfig, data, "", origins, origin=origins)
    if cfg.schema_version != SCHEMA_VERSION:
        raise cfg.error("schema_version", f"schema_version {cfg.schema_version} is not supported (this "
                                          f"version reads {SCHEMA_VERSION})")
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
