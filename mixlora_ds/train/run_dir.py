"""A run directory belongs to one run: its id, the start decision, ``--overwrite``, and the metrics
file cut back to the resumed step.

``<output_dir>/run.json`` holds the run id; every checkpoint records it too. A start without
``--resume`` is refused where a previous run left its outputs (checkpoints, metrics, TensorBoard
events, the completion marker); ``--resume auto`` continues the directory's run (its newest intact
checkpoint); ``--overwrite`` first deletes what a training run writes, by name, and nothing else.
On resume from step N, metric rows past N are dropped and TensorBoard is told to purge events from
step N+1 on (``SummaryWriter(purge_step=N+1)``), so both read as one uninterrupted run.

Rank 0 decides (:func:`decide_start`) and the loop shares the decision with every rank.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mixlora_ds.train.checkpoint import (LATEST, CheckpointError, CheckpointInfo, is_checkpoint_name,
                                         select_checkpoint)
from mixlora_ds.utils.atomic import atomic_write_text

RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"
TRAIN_COMPLETE = "train_complete.json"
TRAIN_STOPPED = "train_stopped.json"
# Files a training run writes into output_dir, by name (with the four above).
_OUTPUT_FILES = ("run_config.yaml", "ds_config.json", "ds_engine_config.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_TB_PREFIX = "events.out.tfevents."


@dataclass
class RunStart:
    run_id: str
    resume: CheckpointInfo | None
    warnings: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.resume.step if self.resume is not None else 0


def read_run_id(output_dir: str) -> str | None:
    path = os.path.join(output_dir, RUN_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            return str(json.load(f)["run_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable run record ({e}); move the directory aside or start with "
                              f"--overwrite", True) from None


def write_run_record(output_dir: str, run_id: str, run_name: str) -> None:
    atomic_write_text(os.path.join(output_dir, RUN_RECORD),
                      json.dumps({"run_id": run_id, "run_name": run_name, "started": time.time()}, indent=2) + "\n")


def previous_run_outputs(cfg: Any) -> list[str]:
    """What a training run wrote that is present: checkpoints, metrics, events, markers."""
    found = [os.path.join(cfg.output_dir, n) for n in (RUN_RECORD, TRAIN_COMPLETE, TRAIN_STOPPED, METRICS)
             if os.path.exists(os.path.join(cfg.output_dir, n))]
    found += _checkpoint_entries(cfg.checkpoint_dir)
    found += _tensorboard_files(cfg.tensorboard_dir)
    return found


def _checkpoint_entries(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root)
                  if (is_checkpoint_name(n) and os.path.isdir(os.path.join(root, n))) or n == LATEST)


def _tensorboard_files(tb_dir: str) -> list[str]:
    if not os.path.isdir(tb_dir):
        return []
    return sorted(os.path.join(tb_dir, n) for n in os.listdir(tb_dir) if n.startswith(_TB_PREFIX))


def decide_start(cfg: Any, resume_spec: str | None, overwrite: bool) -> RunStart:
    """Rank 0: which run this is and where it starts. Raises ``CheckpointError`` (same on every rank)
    for a start that would mix two runs, and performs ``--overwrite``."""
    fresh = resume_spec in (None, "", "none", "None")
    if overwrite and not fresh:
        raise CheckpointError(f"--overwrite starts a new run and --resume {resume_spec} continues one: pass one "
                              f"of them", True)
    if overwrite:
        clear_previous_run(cfg)
    owner = read_run_id(cfg.output_dir)
    if fresh:
        previous = previous_run_outputs(cfg)
        if previous:
            shown = ", ".join(previous[:4]) + (f" and {len(previous) - 4} more" if len(previous) > 4 else "")
            raise CheckpointError(
                f"{cfg.output_dir} holds the outputs of another training run"
                + (f" (run {owner})" if owner else "") + f": {shown}. A new run there would mix with it. "
                f"Continue that run with --resume auto, or start this one in a new output_dir or with "
                f"--overwrite (deletes that run's checkpoints, metrics, TensorBoard events and adapter; "
                f"other files stay)", True)
        return RunStart(uuid.uuid4().hex, None)
    info, warnings = select_checkpoint(resume_spec, cfg.checkpoint_dir, owner)
    run_id = (info.run_id if info is not None else None) or owner or uuid.uuid4().hex
    if owner is not None and run_id != owner:
        raise CheckpointError(
            f"--resume {resume_spec}: {info.path if info else ''} is a checkpoint of run {run_id}, and "
            f"{cfg.output_dir} belongs to run {owner}; continuing there would mix the two: use a new "
            f"output_dir", True)
    return RunStart(run_id, info, warnings)


def clear_previous_run(cfg: Any) -> list[str]:
    """``--overwrite``: delete what a training run writes (by name), never other files; directories
    only when nothing else is left in them. Returns what was removed."""
    removed: list[str] = []

    def rm(path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            return
        removed.append(path)

    for name in (RUN_RECORD, TRAIN_COMPLETE, TRAIN_STOPPED, METRICS) + _OUTPUT_FILES:
        rm(os.path.join(cfg.output_dir, name))
    root = cfg.checkpoint_dir
    for path in _checkpoint_entries(root):
        rm(path)
    if os.path.isdir(root):
        for name in os.listdir(root):  # DeepSpeed's recovery scripts, our temporary files
            if name in ("zero_to_fp32.py", "zero_to_torch.py") or (name.startswith(".") and name.endswith(".tmp")):
                rm(os.path.join(root, name))
    for path in _tensorboard_files(cfg.tensorboard_dir):
        rm(path)
    export = cfg.export_dir
    if os.path.isfile(os.path.join(export, "adapter_config.json")):
        for name in _ADAPTER_FILES:
            rm(os.path.join(export, name))
    for d in (root, cfg.tensorboard_dir, export):
        _rmdir_if_empty(d)
    return removed


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # absent, or holds files that are not ours


def truncate_metrics(path: str, last_step: int) -> int:
    """Drop metric rows past ``last_step`` (written after the checkpoint being resumed); returns how
    many. The file is replaced atomically."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a row cut short by a crash
        if step <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped

