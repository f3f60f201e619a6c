"""Graceful stop on SIGTERM / SIGUSR1 (what Slurm and most schedulers send before preemption), or
when the launcher that started this rank is gone.

The handler only records the request; the training loop polls it once per optimizer step, agrees
with the other ranks through one all-reduce (a signal may reach ranks at different times), finishes
the step it is in, saves a checkpoint and exits with ``EXIT_RESUMABLE`` so that a job script can
tell "stopped early, checkpoint saved, resume me" from success and from failure.

A launcher that dies without signalling its ranks (``kill`` of the ``deepspeed`` command, whose
single-node runner forwards nothing; a crashed ``torchrun``) would leave them training, orphaned. A
rank started by a launcher therefore watches it (its parent, and the ``deepspeed`` runner above
DeepSpeed's per-node launcher) from a thread and stops as on SIGTERM once it is gone. A thread,
not Linux's parent-death signal: that signal follows the parent *thread* that forked the rank, and
no launcher promises to keep that thread alive.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_RESUMABLE = 75
"""Exit status of a run stopped early with a checkpoint saved: resume it (``--resume auto``).
75 is EX_TEMPFAIL of sysexits.h, "temporary failure, try again"."""
WATCH_INTERVAL_S = 0.5
LAUNCHER_EXITED = "launcher exited"
REASONS = tuple(f"signal {sig.name}" for sig in STOP_SIGNALS) + (LAUNCHER_EXITED,)


class StopRequest:
    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._closed = threading.Event()

    def install(self, watch_launcher: bool = False) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if watch_launcher:
            watched = launcher_processes()
            if watched:
                threading.Thread(target=self._watch, args=(os.getppid(), watched), name="launcher-watch",
                                 daemon=True).start()
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
        self._closed.set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # A second signal while saving changes nothing: the save is already coming.
        if self.reason is None:
            self.reason = f"signal {signal.Signals(signum).name}"

    def _watch(self, parent_pid: int, watched: list) -> None:
        while not self._closed.wait(WATCH_INTERVAL_S):
            if os.getppid() != parent_pid or not all(_alive(p) for p in watched):
                if self.reason is None:
                    self.reason = LAUNCHER_EXITED
                return

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def votes(self) -> list[float]:
        """This rank's stop request as one-hot counts over ``REASONS`` (all zero: none), for the
        all-reduce that makes the ranks agree."""
        reason = self.reason  # read once: the launcher watcher may set it meanwhile
        return [1.0 if reason == r else 0.0 for r in REASONS]

    def adopt(self, counts: list[float]) -> None:
        """After the all-reduce of ``votes``: a rank that saw nothing itself takes the reason most
        ranks saw (ranks notice at different times), so rank 0, which writes the log line, the
        checkpoint's metadata and the stop marker, names a real cause; a rank keeps its own."""
        if self.reason is None:
            best = max(range(len(REASONS)), key=lambda i: counts[i])
            if counts[best] > 0:
                self.reason = REASONS[best]

    @property
    def cause(self) -> str:
        """For the log: "SIGTERM received", "launcher exited"."""
        if self.reason and self.reason.startswith("signal "):
            return f"{self.reason[len('signal '):]} received"
        return self.reason or "stop"


def launcher_processes() -> list:
    """The processes whose death means this rank's job is gone: the parent, and above DeepSpeed's
    per-node launcher (``deepspeed.launcher.launch``) the ``deepspeed`` command that started it."""
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        watched = [parent]
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            grandparent = parent.parent()
            if grandparent is not None and grandparent.pid > 1:
                watched.append(grandparent)
        return watched
    except Exception:  # psutil missing or the parent already gone: nothing to watch
        return []


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_by_launcher(environ: dict[str, str] | None = None) -> bool:
    """Whether a launcher (torchrun, deepspeed, srun, mpirun) started this process, judged from the
    variables it sets; a plain ``python launch/train.py`` (perhaps under nohup) watches nothing."""
    env = os.environ if environ is None else environ
    return any(k in env for k in ("LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
