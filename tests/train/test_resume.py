"""Interrupted runs: SIGKILL then ``--resume auto``, and SIGTERM's save-and-exit, replay the same curve.

LoRA dropout is on in these runs, so equal curves also show that every rank's RNG state and reader
position came back from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.train.conftest import (RUN_TIMEOUT, assert_ok, dropout_config, kill_group, max_adapter_diff,
                                  run_training, start_training, wait_for_step, worker_pids, write_config)

pytestmark = pytest.mark.distributed


def assert_same_curve(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    worst = max(abs(a[s]["loss"] - b[s]["loss"]) for s in a)
    assert worst <= tol, [(s, a[s]["loss"], b[s]["loss"]) for s in sorted(a)]


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
    assert max_adapter_diff(out / "adapter", dropout_run.out_dir / "adapter") <= 1e-6


def test_sigterm_saves_a_checkpoint_and_exits_zero_then_resumes(dropout_run, assets, runs_root):
    out = runs_root / "terminated"
    cfg = write_config(dropout_config(assets, out), runs_root / "terminated.yaml")
    proc = start_training(2, cfg, out, runs_root / "terminated.log")
    try:
        wait_for_step(out, 2, proc)
        # What Slurm does before preemption: signal every task of the step.
        for pid in worker_pids(proc):
            os.kill(pid, signal.SIGTERM)
        rc = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        kill_group(proc, signal.SIGKILL)
    log = (runs_root / "terminated.log").read_text()
    assert rc == 0, log[-4000:]
    assert "SIGTERM received" in log
    assert not (out / "train_complete.json").exists()
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "complete.json").exists()]
    assert saved, "no complete checkpoint after SIGTERM"
    newest = max(saved, key=lambda p: p.name)
    meta = json.loads((newest / "complete.json").read_text())
    assert meta["reason"] == "signal SIGTERM" and 2 <= meta["step"] < 12
    assert (newest / "run_config.yaml").is_file() and (newest / "ds_config.json").is_file()

    resumed = run_training(2, cfg, out, "--resume", "auto")
    assert_ok(resumed)
    assert_same_curve(resumed.metrics(), dropout_run.metrics())
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
