"""ScheduledGC: the automatic collector is off while a run trains, and collections fall on fixed steps."""

from __future__ import annotations

import gc

from mixlora_ds.train.gc_schedule import ScheduledGC


def _collections(fn) -> list[int]:
    """Generations collected while ``fn`` runs (the automatic collector included)."""
    seen = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        fn()
    finally:
        gc.callbacks.remove(record)
    return seen


def _make_garbage() -> None:
    """Enough container allocations to trigger CPython's automatic collector several times."""
    for _ in range(50_000):
        a = []
        a.append(a)


def test_collects_only_on_schedule_and_restores_the_collector():
    assert gc.isenabled()
    collector = ScheduledGC(every_steps=3)
    try:
        assert not gc.isenabled()
        assert _collections(_make_garbage) == []
        got = _collections(lambda: [collector.step(s) for s in range(1, 3 * ScheduledGC.FULL_EVERY + 1)])
        assert got == [1] * (ScheduledGC.FULL_EVERY - 1) + [2]
    finally:
        collector.close()
    assert gc.isenabled()


def test_zero_leaves_the_automatic_collector_alone():
    collector = ScheduledGC(every_steps=0)
    assert gc.isenabled()
    assert _collections(lambda: [collector.step(s) for s in range(1, 10)]) == []
    collector.close()
    assert gc.isenabled()
