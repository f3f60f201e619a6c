"""Reading prepared data in training: dataset, resumable rank-sharded sampler, collation.

    ds = PackedDataset("prepared/", split="train")
    sampler = ResumableDistributedSampler(ds, rank, world_size, seed=42)
    loader = DataLoader(ds, batch_size=B, sampler=sampler, collate_fn=collate_packed)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...
    checkpoint["sampler"] = sampler.state_dict()   # later: sampler.load_state_dict(...)

Each packed row holds whole examples; position ids restart at 0 for every example and the
trailing padding forms one more segment of its own (so no row of the attention mask is empty).
Shape legend: B rows in a batch, S row length, N segments in a batch.
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.sampling import record_hashes, stream_key
from mixlora_ds.data.shards import open_shard, read_manifest

IGNORE_INDEX = -100


class PackedDataset(Dataset):
    """Packed rows of one split of a prepared data directory (memory-mapped shards).

    ``ds[i]`` is a dict of numpy arrays: input_ids, labels (IGNORE_INDEX where not trained; not
    shifted), position_ids, task_ids (-1 on padding) of shape [S], and seq_lens, the lengths of
    the row's examples (padding excluded)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train") -> None:
        self.data_dir = str(data_dir)
        self.split = split
        self.manifest = read_manifest(data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{data_dir}: no split {split!r} (has {sorted(splits)})",
                            reason="bad_value", field="split")
        self.seq_len: int = self.manifest["seq_len"]
        self.pad_id: int = self.manifest["pad_id"]
        self.task_names: list[str] = list(self.manifest["tasks"])
        self._shards = [open_shard(data_dir, split, s["name"]) for s in splits[split]["shards"]]
        self._offsets = [0]
        for shard in self._shards:
            self._offsets.append(self._offsets[-1] + shard["input_ids"].shape[0])

    def __len__(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of a global row index."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        shard = bisect.bisect_right(self._offsets, index) - 1
        return shard, index - self._offsets[shard]

    def examples(self, index: int) -> dict[str, np.ndarray]:
        """Per-example metadata of a row: lengths, task ids, input index, record ordinal."""
        shard_i, row = self.locate(index)
        shard = self._shards[shard_i]
        lo, hi = int(shard["row_ptr"][row]), int(shard["row_ptr"][row + 1])
        return {"lens": shard["example_lens"][lo:hi], "tasks": shard["example_tasks"][lo:hi],
                "sources": shard["example_sources"][lo:hi],
                "ordinals": shard["example_ordinals"][lo:hi]}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard_i, row = self.locate(int(index))
        shard = self._shards[shard_i]
        lo, hi = int(shard["row_ptr"][row]), int(shard["row_ptr"][row + 1])
        lens = shard["example_lens"][lo:hi].astype(np.int64)
        tasks = shard["example_tasks"][lo:hi].astype(np.int64)
        S = self.seq_len
        input_ids = np.asarray(shard["input_ids"][row], dtype=np.int64)
        mask = np.asarray(shard["loss_mask"][row], dtype=bool)
        seg_lens, seg_tasks = _segments(lens, tasks, S)
        starts = np.cumsum(seg_lens) - seg_lens
        return {
            "input_ids": input_ids,
            "labels": np.where(mask, input_ids, IGNORE_INDEX),
            "position_ids": np.arange(S, dtype=np.int64) - np.repeat(starts, seg_lens),
            "task_ids": np.repeat(seg_tasks, seg_lens),
            "seq_lens": lens.astype(np.int32),
        }


def _segments(lens: np.ndarray, tasks: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment lengths and task ids of a row: its examples, then padding (task -1) if any."""
    pad = S - int(lens.sum())
    if pad > 0:
        return np.append(lens, pad), np.append(tasks, -1)
    return lens, tasks


def collate_packed(samples: Sequence[dict[str, np.ndarray]], *,
                   attention_mask: bool = True) -> dict[str, Any]:
    """Stack packed rows into a batch.

    Returns input_ids, labels, position_ids, task_ids: [B, S] int64; seq_lens: per row, the
    example lengths (list of lists); cu_seqlens: [N+1] int32 cumulative segment lengths over the
    flattened B*S tokens, trailing padding of a row counted as a segment (varlen attention);
    max_seqlen: int; attention_mask: [B, 1, S, S] bool, True = may attend (block-diagonal
    causal, for SDPA); omitted with attention_mask=False (saves B*S*S bytes on GPU paths)."""
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    out: dict[str, Any] = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
                           for k in ("input_ids", "labels", "position_ids", "task_ids")}
    S = out["input_ids"].shape[1]
    seg_lens: list[int] = []
    seg_ids_BS = np.empty((len(samples), S), dtype=np.int64)
    for b, s in enumerate(samples):
        lens = [int(x) for x in s["seq_lens"]]
        pad = S - sum(lens)
        row = lens + ([pad] if pad > 0 else [])
        seg_ids_BS[b] = np.repeat(np.arange(len(row)), row)
        seg_lens.extend(row)
    out["seq_lens"] = [[int(x) for x in s["seq_lens"]] for s in samples]
    cu = np.zeros(len(seg_lens) + 1, dtype=np.int32)
    np.cumsum(seg_lens, out=cu[1:])
    out["cu_seqlens"] = torch.from_numpy(cu)
    out["max_seqlen"] = max(seg_lens)
    if attention_mask:
        seg_BS = torch.from_numpy(seg_ids_BS)
        same_BSS = seg_BS[:, :, None] == seg_BS[:, None, :]
        causal_SS = torch.ones(S, S, dtype=torch.bool).tril_()
        out["attention_mask"] = (same_BSS & causal_SS).unsqueeze(1)
    return out


class ResumableDistributedSampler(Sampler[int]):
    """Deterministic per-epoch shuffle, sharded over data-parallel ranks, resumable.

    Each epoch is one permutation of all rows (a pure function of seed and epoch); rank r takes
    positions r, r+W, r+2W, ... of it. Without drop_last every row is seen exactly once per
    epoch and ranks differ by at most one row; with drop_last the tail that does not divide by
    W is skipped (a different tail each epoch), so all ranks take the same number of rows.

    The position is global: after every rank consumed k rows, the first k*W rows of the epoch's
    permutation are done. ``state_dict()`` stores it; ``load_state_dict`` restarts from it, also
    with a different world size. With DataLoader workers prefetching ahead, pass the number of
    rows this rank really consumed: ``state_dict(consumed=...)``.
    """

    def __init__(self, dataset: Any, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        self.num_samples = len(dataset)
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self._start = 0     # global position where the current pass over the epoch began
        self._yielded = 0   # rows this rank yielded since _start
        self._exhausted = False

    # -------------------------------------------------------------- order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all rows for an epoch (identical on every rank)."""
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        keys = record_hashes(stream_key(self.seed, "sampler", epoch), np.arange(n, dtype=np.uint64))
        return np.argsort(keys, kind="stable").astype(np.int64)

    def _end(self) -> int:
        rest = self.num_samples - self._start
        return self._start + (rest - rest % self.world_size if self.drop_last else rest)

    def _mine(self) -> np.ndarray:
        order = self.epoch_order(self.epoch)[self._start:self._end()]
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        span = self._end() - self._start
        return max(0, -(-(span - self.rank) // self.world_size))

    def __iter__(self) -> Iterator[int]:
        if self._exhausted:
            # A finished pass iterated again without set_epoch: repeat the epoch from its start,
            # as torch's DistributedSampler does.
            self._start, self._yielded, self._exhausted = 0, 0, False
        mine = self._mine()
        for index in mine[self._yielded:]:
            self._yielded += 1
            yield int(index)
        self._exhausted = True

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded, self._exhausted = epoch, 0, 0, False

    # -------------------------------------------------------------- resume
    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        done = self._yielded if consumed is None else consumed
        if done >= len(self):
            epoch, position = self.epoch + 1, 0   # this rank finished the epoch
        else:
            epoch, position = self.epoch, min(self._start + done * self.world_size,
                                              self.num_samples)
        return {"epoch": epoch, "position": position, "seed": self.seed,
                "num_samples": self.num_samples, "shuffle": self.shuffle,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_samples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler "
                                 f"{getattr(self, key)!r}: not the same data or settings")
        self.epoch = int(state["epoch"])
        self._start = int(state["position"])
        self._yielded = 0
        self._exhausted = False
