"""Interrupted runs: SIGKILL then ``--resume auto``, and SIGTERM's save-and-exit, replay the same curve,
and the metrics file and TensorBoard read as one run afterwards.

LoRA dropout is on in these runs, so equal curves also show that every rank's RNG state and reader
position came back from the checkpoint.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from mixlora_ds.train.signals import EXIT_RESUMABLE
from tests.train.conftest import (RUN_TIMEOUT, assert_ok, dropout_config, kill_group, max_adapter_diff,
                                  run_training, start_ranks, start_training, wait_for_step, write_config)

pytestmark = pytest.mark.distributed


def assert_same_curve(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    worst = max(abs(a[s]["loss"] - b[s]["loss"]) for s in a)
    assert worst <= tol, [(s, a[s]["loss"], b[s]["loss"]) for s in sorted(a)]


def assert_reads_as_one_run(out, reference) -> None:
    """metrics.jsonl holds each step's row once, as the uninterrupted run's file does; TensorBoard (its
    own reader, which applies the resumed writer's purge) shows each step once with the same losses."""
    def rows(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]

    got, want = rows(out), rows(reference)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(d):
        acc = EventAccumulator(str(d / "tensorboard"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    got_tb, want_tb = losses(out), losses(reference)
    assert [s for s, _ in got_tb] == [s for s, _ in want_tb], ([s for s, _ in got_tb], [s for s, _ in want_tb])
    assert max(abs(a - b) for (_, a), (_, b) in zip(got_tb, want_tb)) <= 1e-6


def test_sigkill_then_resume_auto_replays_the_uninterrupted_curve(dropout_run, assets, runs_root):
    out = runs_root / "killed"
    cfg = write_config(dropout_config(assets, out), runs_root / "killed.yaml")
    proc = start_training(2, cfg, out, runs_root / "killed.log")
    try:
        # Steps 1-4 then a checkpoint at 4; kill during step 6-8, before the next checkpoint.
        seen = wait_for_step(out, 6, proc)
        kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_group(proc, signal.SIGKILL)
    assert seen < 12 and not (out / "train_complete.json").exists(), "the run finished before the kill"
    complete = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "complete.json").exists())
    assert complete and complete[-1] in ("step_00000004", "step_00000008")

    resumed = run_training(2, cfg, out, "--resume", "auto")
    assert_ok(resumed)
    assert "resumed from" in resumed.output
    assert_same_curve(resumed.metrics(), dropout_run.metrics())
    assert_reads_as_one_run(out, dropout_run.out_dir)
    assert max_adapter_diff(out / "adapter", dropout_run.out_dir / "adapter") <= 1e-6


def test_sigterm_saves_a_checkpoint_and_exits_75_then_resumes(dropout_run, assets, runs_root):
    out = runs_root / "terminated"
    cfg = write_config(dropout_config(assets, out), runs_root / "terminated.yaml")
    log = runs_root / "terminated.log"
    # The ranks started as srun starts them, so that their own exit statuses are seen (torchrun and the
    # deepspeed launcher turn any non-zero status of a worker into their own failure).
    ranks = start_ranks(2, cfg, out, log)
    try:
        wait_for_step(out, 2, ranks[0])
        t = time.time()
        # What Slurm does before preemption: signal every task of the step.
        for proc in ranks:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=RUN_TIMEOUT) for proc in ranks]
        took = time.time() - t
    finally:
        for proc in ranks:
            kill_group(proc, signal.SIGKILL)
    text = "".join(open(f"{log}.rank{r}").read() for r in (0, 1))
    # Not 0: "stopped early, checkpoint saved, resume me" is not success (no adapter was written).
    assert codes == [EXIT_RESUMABLE] * 2, text[-4000:]
    assert took < 60, took
    assert "SIGTERM received" in text
    assert not (out / "train_complete.json").exists() and not (out / "adapter").exists()
    assert json.loads((out / "train_stopped.json").read_text())["exit"] == EXIT_RESUMABLE
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "complete.json").exists()]
    assert saved, "no complete checkpoint after SIGTERM"
    newest = max(saved, key=lambda p: p.name)
    meta = json.loads((newest / "complete.json").read_text())
    assert meta["reason"] == "signal SIGTERM" and 2 <= meta["step"] < 12
    assert (newest / "run_config.yaml").is_file() and (newest / "ds_config.json").is_file()

    resumed = run_training(2, cfg, out, "--resume", "auto")
    assert_ok(resumed)
    assert_same_curve(resumed.metrics(), dropout_run.metrics())
    assert_reads_as_one_run(out, dropout_run.out_dir)
    assert not (out / "train_stopped.json").exists()
    assert max_adapter_diff(out / "adapter", dropout_run.out_dir / "adapter") <= 1e-6


def test_resume_into_another_zero3_layout_is_refused(dropout_run, assets, runs_root):
    """A checkpoint of the default ZeRO-3 (mixlora_ds sharding, DeepSpeed at stage 2 for the adapter)
    has another file layout than one of DeepSpeed's stage-3 engine: resuming across is refused by
    name, on every rank, instead of failing inside DeepSpeed."""
    out = runs_root / "other_layout"
    cfg = write_config(dropout_config(assets, out) | {"deepspeed": dict(dropout_config(assets, out)["deepspeed"],
                                                                         zero3_impl="deepspeed")},
                       runs_root / "other_layout.yaml")
    saved = dropout_run.out_dir / "checkpoints"
    result = run_training(2, cfg, out, "--resume", str(saved))
    assert result.returncode != 0, result.output[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] checkpoint error:" in result.output
    assert "written by a DeepSpeed engine at ZeRO stage 2, this run's engine is at stage 3" in result.output
    assert "resume with the settings it was saved with" in result.output
    assert not (out / "checkpoints").exists()
