"""The experts of an expert-parallel run in its checkpoints: one file per EP rank, resharded on load.

DeepSpeed's engine checkpoints what it optimizes (the replicated adapter); the experts each rank
owns are saved beside it by the ranks of the first EP group (the other EP groups hold the same
experts), one ``experts_<i>_of_<P>.pt`` per EP rank: values and AdamW moments of experts
``i*E/P .. (i+1)*E/P - 1`` of every layer. Loading cuts what a rank owns out of those files, so a
run may resume with another ``parallel.expert_parallel_size`` (the world size stays: the engine's
own partitions are per rank).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
from typing import Any, Iterator

import torch

from mixlora_ds.train.checkpoint import CheckpointError
from mixlora_ds.utils.atomic import atomic_write_bytes

_FILE_RE = re.compile(r"^experts_(\d{3})_of_(\d{3})\.pt$")


class ExpertCheckpointError(CheckpointError):
    pass


def expert_file(path: str, ep_rank: int, ep_size: int) -> str:
    return os.path.join(path, f"experts_{ep_rank:03d}_of_{ep_size:03d}.pt")


def save_experts(path: str, expert_parallel, optimizer) -> None:
    """Every rank calls it; the first EP group writes."""
    layout = expert_parallel.layout
    if layout.rank >= layout.ep_size:
        return
    payload = {"ep_size": layout.ep_size, "first_expert": layout.first_expert(expert_parallel.num_experts),
               "num_experts": expert_parallel.num_experts, "state": optimizer.state_dict()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(expert_file(path, layout.ep_rank, layout.ep_size), buf.getvalue())


def load_experts(path: str, expert_parallel, optimizer) -> None:
    """This rank's experts (values and optimizer state) from a checkpoint written with any EP size."""
    files = sorted(f for f in glob.glob(os.path.join(path, "experts_*_of_*.pt")) if _FILE_RE.match(os.path.basename(f)))
    if not files:
        raise ExpertCheckpointError(f"{path}: no expert shards (experts_*_of_*.pt): it was saved without expert "
                                    f"parallelism; resume it with parallel.expert_parallel_size: 1")
    sizes = {int(_FILE_RE.match(os.path.basename(f)).group(2)) for f in files}
    if len(sizes) != 1 or len(files) != next(iter(sizes)):
        raise ExpertCheckpointError(f"{path}: expert shards are incomplete or mixed: {[os.path.basename(f) for f in files]}")
    pieces = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    if pieces[0]["num_experts"] != expert_parallel.num_experts:
        raise ExpertCheckpointError(f"{path}: saved with {pieces[0]['num_experts']} experts per layer, this run has "
                                    f"{expert_parallel.num_experts}")
    first = expert_parallel.layout.first_expert(expert_parallel.num_experts)
    optimizer.load_state_dict(cut_experts(pieces, first, expert_parallel.experts_per_rank))


def cut_experts(pieces: list[dict[str, Any]], first: int, count: int) -> dict[str, Any]:
    """Experts ``first .. first+count-1`` of every saved tensor, from per-rank pieces (each holding a
    contiguous run of experts along dim 0 from ``first_expert``)."""
    pieces = sorted(pieces, key=lambda p: p["first_expert"])
    out: dict[str, Any] = {}
    for name in pieces[0]["state"]:
        entry: dict[str, Any] = {}
        for key, value in pieces[0]["state"][name].items():
            if not torch.is_tensor(value):  # the optimizer's step count: the same on every rank
                entry[key] = value
                continue
            parts = []
            for piece in pieces:
                tensor = piece["state"][name][key]
                lo, hi = piece["first_expert"], piece["first_expert"] + tensor.shape[0]
                a, b = max(lo, first), min(hi, first + count)
                if a < b:
                    parts.append(tensor[a - lo:b - lo])
            entry[key] = torch.cat(parts, dim=0)
        out[name] = entry
    return out


@contextlib.contextmanager
def hidden_from_engine_checkpoint(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """DeepSpeed saves the module's trainable parameters with its own state; each rank's experts are
    saved here instead (rank 0's alone would be wrong for the others, and of the wrong shape after a
    change of EP size). Marked frozen for the save, they are left out of it."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
