"""DeepSpeed checkpoints that are either complete or ignored, with keep-last-K and ``--resume auto``.

Layout under the checkpoint root::

    step_00000040/                DeepSpeed's files (trainable state, optimizer, lr scheduler)
        rank_00000.pt ...         per-rank reader position and RNG states
        run_config.yaml           resolved run config
        ds_config.json            resolved DeepSpeed config
        complete.json             written last, by rank 0, after every rank finished writing
    latest                        name of the newest complete checkpoint (informational)

A checkpoint without ``complete.json`` (a crash while saving) is never resumed from and is deleted
by the next successful save. Resume scans for the highest complete step rather than trusting
``latest``, so a crash between the two writes costs nothing.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mixlora_ds import dist
from mixlora_ds.utils.atomic import atomic_write_bytes, atomic_write_text

COMPLETE = "complete.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointInfo:
    path: str
    step: int
    meta: dict[str, Any]

    @property
    def root(self) -> str:
        return os.path.dirname(self.path)

    @property
    def tag(self) -> str:
        return os.path.basename(self.path)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(root: str, complete_only: bool = True) -> list[CheckpointInfo]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _TAG_RE.match(name)
        path = os.path.join(root, name)
        if not m or not os.path.isdir(path):
            continue
        if complete_only and not is_complete(path):
            continue
        meta = {}
        if is_complete(path):
            with open(os.path.join(path, COMPLETE), encoding="utf-8") as f:
                meta = json.load(f)
        out.append(CheckpointInfo(path, int(m.group(1)), meta))
    return sorted(out, key=lambda c: c.step)


def find_resume(spec: str | None, root: str) -> CheckpointInfo | None:
    """``None``/"none": fresh start; "auto": newest complete under ``root`` (or none); else a path."""
    if spec in (None, "", "none", "None"):
        return None
    if spec == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = os.path.abspath(spec)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {spec}: no such checkpoint directory")
    if _TAG_RE.match(os.path.basename(path)):
        if not is_complete(path):
            raise CheckpointError(f"--resume {spec}: checkpoint is incomplete (no {COMPLETE}); it cannot be loaded")
        return next(c for c in list_checkpoints(os.path.dirname(path)) if c.path == path)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"--resume {spec}: no complete checkpoint under this directory")
    return found[-1]


# ------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])


# ----------------------------------------------------------------------------------- the manager
class CheckpointManager:
    def __init__(self, root: str, keep_last: int):
        if keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        self.root = root
        self.keep_last = keep_last

    def save(
        self,
        engine: Any,
        step: int,
        rank_state: dict[str, Any],
        run_config_yaml: str,
        ds_config: dict[str, Any],
        extra_meta: dict[str, Any] | None = None,
        write_extra: Callable[[str], None] | None = None,
    ) -> str:
        """Collective: every rank calls it. Returns the checkpoint directory. ``write_extra(path)``
        runs on every rank after the engine's files are written (expert shards, say)."""
        tag = tag_for(step)
        path = os.path.join(self.root, tag)
        rank = dist.rank()
        if dist.is_main():
            os.makedirs(self.root, exist_ok=True)
            if os.path.isdir(path):  # a leftover from a crashed save of the same step
                shutil.rmtree(path)
        dist.barrier()
        t0 = time.time()
        # Frozen base weights are not saved: the base comes from the model path or the seed.
        engine.save_checkpoint(self.root, tag=tag, save_latest=False, exclude_frozen_parameters=True)
        if write_extra is not None:
            write_extra(path)
        state = dict(rank_state, rng=rng_state(), step=step, rank=rank, world_size=dist.world_size())
        atomic_write_bytes(os.path.join(path, f"rank_{rank:05d}.pt"), _torch_bytes(state))
        dist.barrier()
        if dist.is_main():
            atomic_write_text(os.path.join(path, "run_config.yaml"), run_config_yaml)
            atomic_write_text(os.path.join(path, "ds_config.json"), json.dumps(ds_config, indent=2) + "\n")
            missing = [r for r in range(dist.world_size()) if not os.path.isfile(os.path.join(path, f"rank_{r:05d}.pt"))]
            if missing:
                raise CheckpointError(f"{path}: rank state files missing for ranks {missing}")
            meta = {"step": step, "world_size": dist.world_size(), "time": time.time(),
                    "save_seconds": round(time.time() - t0, 3), **(extra_meta or {})}
            _fsync_dir(path)
            atomic_write_text(os.path.join(path, COMPLETE), json.dumps(meta, indent=2) + "\n")
            atomic_write_text(os.path.join(self.root, "latest"), tag + "\n")
            self._prune(step)
        dist.barrier()
        return path

    def _prune(self, newest: int) -> None:
        complete = list_checkpoints(self.root)
        for c in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(c.path, ignore_errors=True)
        for c in list_checkpoints(self.root, complete_only=False):
            if not is_complete(c.path) and c.step < newest:
                shutil.rmtree(c.path, ignore_errors=True)

    def load(self, engine: Any, info: CheckpointInfo, engine_stage: int | None = None) -> dict[str, Any]:
        """Collective. Restores engine state and this rank's RNG; returns this rank's saved state.
        ``engine_stage``: the ZeRO stage this run's DeepSpeed engine runs (checked against the saved one)."""
        saved_world = info.meta.get("world_size")
        if saved_world is not None and saved_world != dist.world_size():
            raise CheckpointError(
                f"{info.path}: saved with {saved_world} ranks, resuming with {dist.world_size()}; ZeRO "
                f"partitions and reader positions are per rank, so resume with the same world size"
            )
        if engine_stage is not None:
            check_engine_stage(info, engine_stage)
        load_path, _ = engine.load_checkpoint(
            info.root, tag=info.tag, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise CheckpointError(f"{info.path}: DeepSpeed could not load this checkpoint")
        rank_file = os.path.join(info.path, f"rank_{dist.rank():05d}.pt")
        state = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(state["rng"])
        return state


def saved_engine_stage(info: CheckpointInfo) -> int | None:
    """The ZeRO stage of the DeepSpeed engine that wrote a checkpoint: recorded in its marker, or for
    checkpoints from before that record (always DeepSpeed's own engine), its ds_config.json's stage."""
    if "engine_stage" in info.meta:
        return int(info.meta["engine_stage"])
    path = os.path.join(info.path, "ds_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return int(json.load(f).get("zero_optimization", {}).get("stage", 0))


def check_engine_stage(info: CheckpointInfo, engine_stage: int) -> None:
    """DeepSpeed lays out its checkpoint files by the engine's ZeRO stage: refuse to resume across a
    change. ZeRO-3 with the base sharded by mixlora_ds runs a stage-2 engine, so it resumes ZeRO-2
    checkpoints and the other way round (the frozen base is never in them)."""
    saved = saved_engine_stage(info)
    if saved is not None and saved != engine_stage:
        raise CheckpointError(
            f"{info.path}: written by a DeepSpeed engine at ZeRO stage {saved}, this run's engine is at stage "
            f"{engine_stage}; their checkpoint files differ, so resume with the settings it was saved with "
            f"(the DeepSpeed config's stage, and deepspeed.zero3_impl, which under ZeRO-3 decides whether "
            f"DeepSpeed's engine runs stage 3 or stage 2)"
        )


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _fsync_dir(path: str) -> None:
    """Make the files of a checkpoint durable before the marker that declares it complete."""
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
