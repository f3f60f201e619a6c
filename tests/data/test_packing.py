"""First-fit decreasing: the vectorised version places every item exactly where the textbook
one-item-at-a-time algorithm does; packed rows keep examples whole and in bounds."""

from __future__ import annotations

import numpy as np
import pytest

from mixlora_ds.data.encode import ExampleBatch
from mixlora_ds.data.packing import WindowPacker, ffd_assign, pack_examples


def naive_ffd(lengths: list[int], capacity: int) -> list[int]:
    """Textbook first-fit decreasing, one item at a time (stable order for equal lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room: list[int] = []
    row = [0] * len(lengths)
    for i in order:
        for r, free in enumerate(room):
            if free >= lengths[i]:
                room[r] -= lengths[i]
                row[i] = r
                break
        else:
            room.append(capacity - lengths[i])
            row[i] = len(room) - 1
    return row


@pytest.mark.parametrize("seed,capacity,n,high", [(0, 64, 300, 64), (1, 128, 500, 40),
                                                  (2, 256, 400, 256), (3, 50, 200, 7),
                                                  (4, 32, 1, 32)])
def test_ffd_matches_textbook_algorithm(seed, capacity, n, high):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, high + 1, size=n)
    row, order, num_rows = ffd_assign(lengths, capacity)
    assert row.tolist() == naive_ffd(lengths.tolist(), capacity)
    assert num_rows == row.max() + 1
    used = np.bincount(row, weights=lengths, minlength=num_rows)
    assert used.max() <= capacity
    # Placement order: decreasing length, stable.
    assert order.tolist() == sorted(range(n), key=lambda i: -lengths[i])


def test_ffd_rejects_items_longer_than_a_row():
    with pytest.raises(ValueError):
        ffd_assign(np.array([3, 9]), 8)


def _batch(lengths: list[int], seed: int = 0) -> ExampleBatch:
    rng = np.random.default_rng(seed)
    total = sum(lengths)
    return ExampleBatch(tokens=rng.integers(3, 1000, size=total).astype(np.int32),
                        loss_mask=rng.integers(0, 2, size=total).astype(np.uint8),
                        lengths=np.array(lengths, dtype=np.int32),
                        task_ids=rng.integers(0, 5, size=len(lengths)).astype(np.int16),
                        source_ids=np.zeros(len(lengths), dtype=np.int32),
                        ordinals=np.arange(len(lengths), dtype=np.int64))


def test_pack_keeps_examples_whole_and_in_bounds():
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 65, size=257).tolist()
    batch = _batch(lengths)
    rows = pack_examples(batch, 64, pad_id=0)
    starts = np.cumsum(lengths) - np.array(lengths)
    seen = []
    for r in range(rows.num_rows):
        lo, hi = rows.row_ptr[r], rows.row_ptr[r + 1]
        lens = rows.example_lens[lo:hi]
        assert lens.sum() <= 64 and hi > lo
        pos = 0
        for k in range(lo, hi):
            ex = int(rows.example_ordinals[k])
            seen.append(ex)
            L = lengths[ex]
            assert rows.example_lens[k] == L
            assert rows.example_tasks[k] == batch.task_ids[ex]
            src = slice(starts[ex], starts[ex] + L)
            np.testing.assert_array_equal(rows.input_ids_RS[r, pos:pos + L], batch.tokens[src])
            np.testing.assert_array_equal(rows.loss_mask_RS[r, pos:pos + L], batch.loss_mask[src])
            pos += L
        assert (rows.input_ids_RS[r, pos:] == 0).all() and (rows.loss_mask_RS[r, pos:] == 0).all()
    assert sorted(seen) == list(range(len(lengths)))  # every example exactly once


def test_window_packer_flushes_bounded_windows():
    emitted = []
    packer = WindowPacker(capacity=32, pad_id=0, window_tokens=100, emit=emitted.append)
    for seed in range(7):
        packer.add(_batch([20, 15, 10], seed))   # 45 tokens per batch: a window every 3 batches
    assert len(emitted) == 2
    packer.flush()                               # the 7th batch
    assert len(emitted) == 3
    assert [int(r.example_lens.shape[0]) for r in emitted] == [9, 9, 3]
