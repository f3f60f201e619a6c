"""Python garbage collection at fixed steps, on every rank at the same step.

CPython's collector runs whenever allocations cross a threshold. A full pass over the object graph
of a large model and its engine takes tens of milliseconds; with several ranks, each pauses at a
different step and every collective then waits for whichever rank is collecting. Collecting at fixed
steps instead puts all the pauses on the same step (torchtitan's ``gc_freq`` does the same).
"""

from __future__ import annotations

import gc


class ScheduledGC:
    """Automatic collection off while active; young generations every ``every_steps`` steps and a
    full collection every ``FULL_EVERY`` of those, so cyclic garbage that reached the old generation
    is still freed. ``every_steps <= 0`` leaves CPython's collector alone."""

    FULL_EVERY = 20

    def __init__(self, every_steps: int):
        self.every_steps = every_steps
        self._was_enabled = gc.isenabled()
        if every_steps > 0:
            gc.collect()
            gc.disable()

    def step(self, step: int) -> None:
        if self.every_steps > 0 and step % self.every_steps == 0:
            gc.collect(2 if step % (self.every_steps * self.FULL_EVERY) == 0 else 1)

    def close(self) -> None:
        if self.every_steps > 0 and self._was_enabled:
            gc.enable()
