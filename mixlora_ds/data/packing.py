"""First-fit-decreasing packing of whole examples into fixed-length rows.

``ffd_assign`` is exact first-fit decreasing (items sorted by length, longest first, ties in
stream order; each goes into the lowest-numbered row with room), computed one length class at a
time with numpy: all items of one length fill the rows with room in row order, floor(room / L)
each, which is what placing them one by one would do. Cost O(#distinct lengths x #rows) vector
work instead of a Python loop per item.

``WindowPacker`` applies it to a bounded window of the example stream (a few million tokens), so
memory stays flat however large the input is; a row never spans two windows, which costs a
fraction of a row per window in packing efficiency.

Shape legend: N items (examples), R rows (bins), S row length (seq_len), T tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mixlora_ds.data.encode import ExampleBatch


def ffd_assign(lengths_N: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing.

    Returns (row_N, order_N, num_rows): row_N[i] is the row of item i; order_N is the placement
    order (a permutation of items: decreasing length, stable), which is also the order of items
    inside each row.
    """
    lengths_N = np.asarray(lengths_N, dtype=np.int64)
    n = lengths_N.shape[0]
    if n and (lengths_N.min() <= 0 or lengths_N.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    order_N = np.argsort(-lengths_N, kind="stable")
    row_sorted_N = np.empty(n, dtype=np.int64)
    room_R = np.empty(max(16, n // 4), dtype=np.int64)
    num_rows = 0
    sorted_lengths = lengths_N[order_N]
    # Boundaries of equal-length runs in the sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1]]) if n else []
    ends = np.r_[starts[1:], n] if n else []
    for lo, hi in zip(starts, ends):
        length = int(sorted_lengths[lo])
        need = int(hi - lo)
        placed = 0
        if num_rows:
            cand_C = np.flatnonzero(room_R[:num_rows] >= length)
            if cand_C.size:
                fits_C = room_R[cand_C] // length
                cum_C = np.cumsum(fits_C)
                k = int(np.searchsorted(cum_C, need))       # rows used: cand_C[:k+1]
                k = min(k, cand_C.size - 1)
                take_C = fits_C[: k + 1].copy()
                take_C[-1] -= max(int(cum_C[k]) - need, 0)
                placed = int(take_C.sum())
                row_sorted_N[lo:lo + placed] = np.repeat(cand_C[: k + 1], take_C)
                room_R[cand_C[: k + 1]] -= take_C * length
        rest = need - placed
        if rest:
            per_row = capacity // length
            new_rows = -(-rest // per_row)
            if num_rows + new_rows > room_R.shape[0]:
                grown = np.empty(max(2 * room_R.shape[0], num_rows + new_rows), dtype=np.int64)
                grown[:num_rows] = room_R[:num_rows]
                room_R = grown
            local = np.arange(rest) // per_row
            row_sorted_N[lo + placed:hi] = num_rows + local
            counts = np.bincount(local, minlength=new_rows)
            room_R[num_rows:num_rows + new_rows] = capacity - counts * length
            num_rows += new_rows
    row_N = np.empty(n, dtype=np.int64)
    row_N[order_N] = row_sorted_N
    return row_N, order_N, num_rows


@dataclass
class PackedRows:
    """Rows of one window: tokens and mask [R, S]; examples in row order with a row pointer."""

    input_ids_RS: np.ndarray
    loss_mask_RS: np.ndarray
    row_ptr: np.ndarray           # [R+1] int64: examples of row r are row_ptr[r]:row_ptr[r+1]
    example_lens: np.ndarray      # [N] int32
    example_tasks: np.ndarray     # [N] int16
    example_sources: np.ndarray   # [N] int32
    example_ordinals: np.ndarray  # [N] int64

    @property
    def num_rows(self) -> int:
        return int(self.input_ids_RS.shape[0])


def pack_examples(batch: ExampleBatch, capacity: int, pad_id: int) -> PackedRows:
    """Pack every example of ``batch`` (each <= capacity tokens) into rows of ``capacity``."""
    lengths_N = batch.lengths.astype(np.int64)
    row_N, order_N, num_rows = ffd_assign(lengths_N, capacity)
    # Examples in output order: by row, and inside a row in placement order.
    rank_N = np.empty_like(order_N)
    rank_N[order_N] = np.arange(order_N.shape[0])
    out_N = np.lexsort((rank_N, row_N))
    lens_out = lengths_N[out_N]
    rows_out = row_N[out_N]
    src_start_N = np.cumsum(lengths_N) - lengths_N             # offset of each example in input
    stream_start = np.cumsum(lens_out) - lens_out              # offset in the reordered stream
    row_first = np.searchsorted(rows_out, np.arange(num_rows))  # first example of each row
    offset_in_row = stream_start - stream_start[row_first[rows_out]]
    dst_start = rows_out * capacity + offset_in_row
    ids_flat = np.full(num_rows * capacity, pad_id, dtype=batch.tokens.dtype)
    mask_flat = np.zeros(num_rows * capacity, dtype=np.uint8)
    # One slice copy per example: cheaper than building per-token index arrays (fewer passes
    # over memory) for any realistic example length.
    tokens, loss_mask = batch.tokens, batch.loss_mask
    for src, dst, n in zip(src_start_N[out_N].tolist(), dst_start.tolist(), lens_out.tolist()):
        ids_flat[dst:dst + n] = tokens[src:src + n]
        mask_flat[dst:dst + n] = loss_mask[src:src + n]
    row_ptr = np.zeros(num_rows + 1, dtype=np.int64)
    row_ptr[1:] = np.cumsum(np.bincount(rows_out, minlength=num_rows))
    return PackedRows(
        input_ids_RS=ids_flat.reshape(num_rows, capacity),
        loss_mask_RS=mask_flat.reshape(num_rows, capacity),
        row_ptr=row_ptr,
        example_lens=lens_out.astype(np.int32),
        example_tasks=batch.task_ids[out_N],
        example_sources=batch.source_ids[out_N],
        example_ordinals=batch.ordinals[out_N],
    )


def concat_batches(batches: list[ExampleBatch]) -> ExampleBatch:
    if len(batches) == 1:
        return batches[0]
    return ExampleBatch(*(np.concatenate([getattr(b, f) for b in batches]) for f in
                          ("tokens", "loss_mask", "lengths", "task_ids", "source_ids",
                           "ordinals")))


class WindowPacker:
    """Collects examples until ``window_tokens`` are buffered, then packs them and hands the rows
    to ``emit``. Deterministic: windows close at the same examples for the same input."""

    def __init__(self, capacity: int, pad_id: int, window_tokens: int,
                 emit: Callable[[PackedRows], None]) -> None:
        self.capacity = capacity
        self.pad_id = pad_id
        self.window_tokens = window_tokens
        self.emit = emit
        self._pending: list[ExampleBatch] = []
        self._pending_tokens = 0

    def add(self, batch: ExampleBatch) -> None:
        if batch.num_examples == 0:
            return
        self._pending.append(batch)
        self._pending_tokens += int(batch.tokens.shape[0])
        if self._pending_tokens >= self.window_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        batch = concat_batches(self._pending)
        self._pending, self._pending_tokens = [], 0
        self.emit(pack_examples(batch, self.capacity, self.pad_id))
