"""Graceful stop on SIGTERM / SIGUSR1 (what Slurm and most schedulers send before preemption).

The handler only records the request; the training loop polls it once per optimizer step, agrees
with the other ranks through one all-reduce (a signal may reach ranks at different times), finishes
the step it is in, saves a checkpoint and exits 0 so a requeued job resumes with ``--resume auto``.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # A second signal while saving changes nothing: the save is already coming.
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
