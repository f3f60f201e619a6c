"""DeepSpeed checkpoints that are either complete or ignored, verified before use, with keep-last-K
and ``--resume auto``.

Layout under the checkpoint root::

    step_00000040/                DeepSpeed's files (trainable state, optimizer, lr scheduler)
        rank_00000.pt ...         per-rank reader position and RNG states
        run_config.yaml           resolved run config
        ds_config.json            resolved DeepSpeed config
        complete.json             written last, by rank 0, after every rank finished writing: the
                                  step, the run id, and the size and SHA-256 of every other file
    latest                        name of the newest complete checkpoint (informational)

A checkpoint without ``complete.json`` (a crash while saving) is never resumed from and is deleted
by the next successful save. Resume scans for the highest complete step of the run rather than
trusting ``latest``, so a crash between the two writes costs nothing, and checks every file's size
and checksum first: ``--resume auto`` passes over a damaged checkpoint to the newest intact one
with a warning that names the bad file; a damaged checkpoint named explicitly is refused.
Checkpoints hold only the trainable adapter state, and each rank hashes the files it wrote itself
(streamed, in parallel threads), so the checksums cost little next to writing them
(benchmarks/bench_checkpoint_checksums.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mixlora_ds import dist
from mixlora_ds.utils.atomic import atomic_write_bytes, atomic_write_text

COMPLETE = "complete.json"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written. ``same_on_every_rank``: every rank raises this very
    message (a decision made once and shared), so one rank reporting it is enough."""

    def __init__(self, message: str, same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank


@dataclass
class CheckpointInfo:
    path: str
    step: int
    meta: dict[str, Any]
    problem: str | None = None
    """Why the completion marker cannot be read (the checkpoint is then damaged), else None."""

    @property
    def root(self) -> str:
        return os.path.dirname(self.path)

    @property
    def tag(self) -> str:
        return os.path.basename(self.path)

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint_name(name: str) -> bool:
    return _TAG_RE.match(name) is not None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_checkpoints(root: str, complete_only: bool = True) -> list[CheckpointInfo]:
    """Checkpoints under ``root`` by step. A complete one whose marker cannot be read is listed
    with ``problem`` set (it is damaged, not incomplete)."""
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
        meta: dict[str, Any] = {}
        problem = None
        if is_complete(path):
            meta, problem = _read_marker(os.path.join(path, COMPLETE))
        out.append(CheckpointInfo(path, int(m.group(1)), meta, problem))
    return sorted(out, key=lambda c: c.step)


def _read_marker(path: str) -> tuple[dict[str, Any], str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return {}, f"{path}: unreadable completion marker ({e})"
    if not isinstance(meta, dict):
        return {}, f"{path}: unreadable completion marker (not a JSON object)"
    return meta, None


def find_resume(spec: str | None, root: str, run_id: str | None = None) -> CheckpointInfo | None:
    """:func:`select_checkpoint`, its warnings logged."""
    info, warnings = select_checkpoint(spec, root, run_id)
    for warning in warnings:
        logging.getLogger("mixlora_ds.train").warning("%s", warning)
    return info


def select_checkpoint(spec: str | None, root: str,
                      run_id: str | None = None) -> tuple[CheckpointInfo | None, list[str]]:
    """The checkpoint to resume from, verified, and one warning per damaged checkpoint passed over.

    ``None``/"none": fresh start. "auto": the newest intact checkpoint under ``root`` of run
    ``run_id`` (of any run when None), or none at all. Else a checkpoint directory (used as named:
    damaged means refused), or a checkpoint root (its newest intact one, as "auto").
    """
    if spec in (None, "", "none", "None"):
        return None, []
    if spec == "auto":
        return _newest_intact(root, run_id, spec, missing_ok=True)
    path = os.path.abspath(spec)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {spec}: no such checkpoint directory", True)
    if not _TAG_RE.match(os.path.basename(path)):
        return _newest_intact(path, None, spec, missing_ok=False)
    if not is_complete(path):
        raise CheckpointError(f"--resume {spec}: checkpoint is incomplete (no {COMPLETE}); it cannot be loaded", True)
    info = next(c for c in list_checkpoints(os.path.dirname(path)) if c.path == path)
    problem = verify_checkpoint(info)
    if problem:
        others = [c.tag for c in list_checkpoints(info.root) if c.path != path]
        raise CheckpointError(
            f"--resume {spec}: checkpoint is damaged: {problem}. Resume from another checkpoint"
            + (f" ({', '.join(others)} under {info.root})" if others else "")
            + " or with --resume auto, which takes the newest intact one", True)
    return info, []


def _newest_intact(root: str, run_id: str | None, spec: str,
                   missing_ok: bool) -> tuple[CheckpointInfo | None, list[str]]:
    found = [c for c in list_checkpoints(root) if belongs_to(c, run_id)]
    warnings = []
    for info in reversed(found):
        problem = verify_checkpoint(info)
        if problem is None:
            return info, warnings
        warnings.append(f"checkpoint {info.path} is damaged and skipped: {problem}")
    if warnings:
        raise CheckpointError(f"--resume {spec}: no intact checkpoint under {root}: " + "; ".join(warnings), True)
    if not missing_ok:
        raise CheckpointError(f"--resume {spec}: no complete checkpoint under this directory", True)
    return None, []


def belongs_to(info: CheckpointInfo, run_id: str | None) -> bool:
    """Whether a checkpoint is of run ``run_id`` (any run when None). One without a run id (saved
    before ids were recorded, or with an unreadable marker) counts as the directory's own: a new run
    never starts in a directory that holds checkpoints."""
    return run_id is None or info.run_id in (run_id, None)


# ------------------------------------------------------------------------------ file checksums
_CHUNK = 16 * 2**20


def _sha256(path: str) -> str:
    # hashlib releases the GIL on large buffers, so files hash in parallel threads.
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files_of(path: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def _hash_all(path: str, rels: list[str]) -> list[str]:
    if not rels:
        return []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(rels))) as pool:
        return list(pool.map(lambda rel: _sha256(os.path.join(path, rel)), rels))


def file_manifest(path: str, rels: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of the files ``rels`` of a checkpoint (default: all but its completion marker)."""
    rels = _files_of(path) if rels is None else rels
    digests = _hash_all(path, rels)
    return {rel: {"size": os.path.getsize(os.path.join(path, rel)), "sha256": d} for rel, d in zip(rels, digests)}


_WRITER_RE = re.compile(r"(?:zero_pp_rank_|rank_)(\d+)")


def writer_rank(rel: str, world_size: int) -> int:
    """The rank that wrote a checkpoint file, judged by its name (DeepSpeed's ``*zero_pp_rank_<r>_*``
    optimizer shards, our ``rank_<r>.pt``); rank 0 for the rest. It hashes the file while it is still
    in its own page cache, which on a multi-node shared file system saves reading it over the network."""
    m = _WRITER_RE.search(os.path.basename(rel))
    r = int(m.group(1)) if m else 0
    return r if r < world_size else 0


def verify_checkpoint(info: CheckpointInfo) -> str | None:
    """None when every file recorded at save time is there with its size and checksum, else what is
    wrong, naming the file. Checkpoints from before the record are taken as they are."""
    if info.problem:
        return info.problem
    files = info.meta.get("files")
    if files is None:
        return None
    for rel, rec in sorted(files.items()):
        p = os.path.join(info.path, rel)
        if not os.path.isfile(p):
            return f"{p}: missing"
        size = os.path.getsize(p)
        if size != rec["size"]:
            return f"{p}: {size} bytes, {rec['size']} when saved (truncated or overwritten)"
    rels = sorted(files)
    for rel, digest in zip(rels, _hash_all(info.path, rels)):
        if digest != files[rel]["sha256"]:
            return f"{os.path.join(info.path, rel)}: contents differ from the checksum recorded when saved"
    return None


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
    def __init__(self, root: str, keep_last: int, run_id: str | None = None):
        if keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        self.root = root
        self.keep_last = keep_last
        self.run_id = run_id

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
        runs on every rank after the engine's files are written (expert shards, say).

        A failure on any rank (a full disk, say) is agreed on by all ranks, the partial checkpoint is
        removed, and every rank raises one ``CheckpointError``; earlier checkpoints are untouched.
        """
        tag = tag_for(step)
        path = os.path.join(self.root, tag)
        rank = dist.rank()
        if dist.is_main():
            os.makedirs(self.root, exist_ok=True)
            if os.path.isdir(path):  # a leftover from a crashed save of the same step
                shutil.rmtree(path)
        dist.barrier()
        t0 = time.time()
        error: BaseException | None = None
        inside_engine = True
        try:
            # Frozen base weights are not saved: the base comes from the model path or the seed.
            engine.save_checkpoint(self.root, tag=tag, save_latest=False, exclude_frozen_parameters=True)
            inside_engine = False
            if write_extra is not None:
                write_extra(path)
            state = dict(rank_state, rng=rng_state(), step=step, rank=rank, world_size=dist.world_size())
            atomic_write_bytes(os.path.join(path, f"rank_{rank:05d}.pt"), _torch_bytes(state))
        except Exception as e:  # agreed on below, so no rank waits forever in a collective
            error = e
            if inside_engine:
                dist.barrier()  # the engine's closing barrier, where the ranks that wrote their part wait
        failed = dist.all_reduce_(torch.tensor([1.0 if error else 0.0]), "max").item() > 0
        if failed:
            errors = dist.all_gather_object(None if error is None else _describe(error))
            self._fail(tag, [(r, e) for r, e in enumerate(errors) if e])
        hashed = self._hash_own_files(tag, path, t0)
        message = None
        if dist.is_main():
            try:
                self._complete(path, step, run_config_yaml, ds_config, t0, extra_meta, hashed)
            except Exception as e:
                message = self._failure_message(tag, [(0, _describe(e))])
                shutil.rmtree(path, ignore_errors=True)
        message = dist.broadcast_object(message)
        if message:
            raise CheckpointError(message, True)
        return path

    def _hash_own_files(self, tag: str, path: str, t0: float) -> dict[str, dict[str, Any]]:
        """Collective: every rank checksums the files it wrote (in parallel threads); all get the union."""
        t = time.time()
        mine, error = {}, None
        try:
            rank, world = dist.rank(), dist.world_size()
            mine = file_manifest(path, [rel for rel in _files_of(path) if writer_rank(rel, world) == rank])
        except OSError as e:
            error = _describe(e)
        gathered = dist.all_gather_object((mine, error))
        errors = [(r, e) for r, (_, e) in enumerate(gathered) if e]
        if errors:
            self._fail(tag, errors)
        self._checksum_seconds = time.time() - t
        return {rel: rec for files, _ in gathered for rel, rec in files.items()}

    def _complete(self, path: str, step: int, run_config_yaml: str, ds_config: dict[str, Any], t0: float,
                  extra_meta: dict[str, Any] | None, hashed: dict[str, dict[str, Any]]) -> None:
        """Rank 0, after every rank wrote its files: configs, checksums, the completion marker, pruning."""
        atomic_write_text(os.path.join(path, "run_config.yaml"), run_config_yaml)
        atomic_write_text(os.path.join(path, "ds_config.json"), json.dumps(ds_config, indent=2) + "\n")
        missing = [r for r in range(dist.world_size()) if not os.path.isfile(os.path.join(path, f"rank_{r:05d}.pt"))]
        if missing:
            raise CheckpointError(f"{path}: rank state files missing for ranks {missing}")
        _fsync_dir(path)
        t_hash = time.time()
        files = {**hashed, **file_manifest(path, [rel for rel in _files_of(path) if rel not in hashed])}
        meta = {"step": step, "run_id": self.run_id, "world_size": dist.world_size(), "time": time.time(),
                "save_seconds": round(time.time() - t0, 3),
                "checksum_seconds": round(self._checksum_seconds + time.time() - t_hash, 3),
                **(extra_meta or {}), "files": files}
        atomic_write_text(os.path.join(path, COMPLETE), json.dumps(meta, indent=2) + "\n")
        self._prune(step)
        atomic_write_text(os.path.join(self.root, LATEST), os.path.basename(path) + "\n")

    def _fail(self, tag: str, errors: list[tuple[int, str]]) -> None:
        message = None
        if dist.is_main():
            message = self._failure_message(tag, errors)
            shutil.rmtree(os.path.join(self.root, tag), ignore_errors=True)
        raise CheckpointError(dist.broadcast_object(message), True)

    def _failure_message(self, tag: str, errors: list[tuple[int, str]]) -> str:
        """Rank 0: what failed, whether the disk is full, and which checkpoint is still there."""
        previous = [c for c in list_checkpoints(self.root) if c.tag != tag and belongs_to(c, self.run_id)]
        kept = (f"the previous checkpoint {previous[-1].path} is intact; " if previous
                else "no earlier checkpoint of this run exists; ")
        free = shutil.disk_usage(self.root).free if os.path.isdir(self.root) else 0
        # torch's writer reports a full disk as a bare "file write failed": the free space tells.
        if free < _LOW_SPACE or any(_NO_SPACE in e for _, e in errors):
            needed = _dir_bytes(previous[-1].path) if previous else 0
            return (f"saving checkpoint {tag} failed: no space left on the device of {self.root} "
                    f"({free / 2**20:.1f} MiB free" + (f"; a checkpoint takes about {needed / 2**20:.1f} MiB, and "
                    f"{self.keep_last} of them plus the one being written are kept" if needed else "")
                    + f"); {kept}free space, then resume with --resume auto")
        where = "; ".join(f"rank {r}: {e}" for r, e in errors)
        return f"saving checkpoint {tag} failed ({where}); {kept}resume with --resume auto once it is fixed"

    def _prune(self, newest: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints of this run; drop this run's crashed saves."""
        mine = [c for c in list_checkpoints(self.root) if belongs_to(c, self.run_id)]
        for c in mine[: max(0, len(mine) - self.keep_last)]:
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


_NO_SPACE = "No space left on device"
_LOW_SPACE = 2**20  # bytes free below which a failed write is put down to a full disk


def _describe(error: BaseException) -> str:
    """One line for an exception; a full disk always reads "No space left on device", whatever layer
    (torch's writer, DeepSpeed) wrapped the OS error."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return text if _NO_SPACE in text else f"{_NO_SPACE} ({text})"
        e = e.__cause__ or e.__context__
    return text


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


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
