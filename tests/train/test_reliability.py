"""Reliability on real ranks (2 CPU ranks, gloo, real DeepSpeed): a run directory belongs to one run,
damaged checkpoints are passed over, ranks outlive neither their launcher nor a dead peer, and a full
disk or a kill during a checkpoint write loses nothing that was saved before."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixlora_ds.train.checkpoint import list_checkpoints, verify_checkpoint
from mixlora_ds.train.signals import EXIT_RESUMABLE
from tests.train.conftest import (REPO, RUN_TIMEOUT, TRAIN, assert_ok, dropout_config, kill_group, launch_env,
                                  max_adapter_diff, read_metrics, run_config, run_ranks, run_training, start_ranks,
                                  start_training, wait_for_step, write_config)
from tests.train.test_resume import assert_same_curve

pytestmark = pytest.mark.distributed


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_steps(root: Path) -> list[int]:
    return [c.step for c in list_checkpoints(str(root))]


def test_a_new_run_in_a_used_directory_is_refused_and_overwrite_replaces_only_the_old_run(
        dropout_run, assets, runs_root):
    out = runs_root / "reused"
    shutil.copytree(dropout_run.out_dir, out)  # a finished 12-step run with checkpoints 8 and 12
    (out / "notes.txt").write_text("the user's own notes")
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    before = snapshot(out)
    cfg = write_config(run_config(assets, out, optim__lr=1e-3), runs_root / "reused.yaml")

    refused = run_ranks(2, cfg, out)  # started as srun does: the ranks' own status and output
    assert refused.returncode == 2, refused.output[-3000:]
    assert refused.output.count("checkpoint error:") == 1  # one message, from rank 0
    assert f"holds the outputs of another training run (run {old_id})" in refused.output
    assert "--resume auto" in refused.output and "--overwrite" in refused.output
    assert "Traceback" not in refused.output
    assert snapshot(out) == before, "a refused start changed the directory"

    fresh = run_training(2, cfg, out, "--overwrite")
    assert_ok(fresh)
    new_id = json.loads((out / "run.json").read_text())["run_id"]
    assert new_id != old_id
    saved = list_checkpoints(str(out / "checkpoints"))
    assert [c.step for c in saved] == [4, 8] and {c.run_id for c in saved} == {new_id}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))
    assert (out / "notes.txt").read_text() == "the user's own notes"


def test_a_damaged_latest_checkpoint_is_refused_by_name_and_passed_over_by_resume_auto(
        dropout_run, assets, runs_root):
    out = runs_root / "damaged"
    shutil.copytree(dropout_run.out_dir, out)
    cfg = write_config(dropout_config(assets, out), runs_root / "damaged.yaml")
    newest = out / "checkpoints" / "step_00000012"
    pristine = snapshot(newest)
    victims = [next(newest.glob("*model_states.pt")), next(newest.glob("*zero_pp_rank_1_*optim_states.pt")),
               newest / "rank_00000.pt", newest / "complete.json"]
    for victim in victims:  # a truncated file of each kind: one clear message, before any model is built
        victim.write_bytes(pristine[victim.name][: len(pristine[victim.name]) // 2])
        explicit = run_ranks(2, cfg, out, "--resume", str(newest))
        assert explicit.returncode == 2, explicit.output[-3000:]
        assert explicit.output.count("checkpoint error:") == 1, explicit.output[-3000:]
        assert f"checkpoint is damaged: {victim}" in explicit.output, explicit.output[-3000:]
        assert "Traceback" not in explicit.output and "model:" not in explicit.output
        victim.write_bytes(pristine[victim.name])

    victim = victims[1]
    victim.write_bytes(pristine[victim.name][:100])
    resumed = run_training(2, cfg, out, "--resume", "auto")
    assert_ok(resumed)
    warnings = [line for line in resumed.output.splitlines() if "damaged and skipped" in line]
    assert len(warnings) == 1 and str(victim) in warnings[0], warnings
    assert f"resumed from {out / 'checkpoints' / 'step_00000008'}" in resumed.output
    assert_same_curve(resumed.metrics(), dropout_run.metrics())
    assert max_adapter_diff(out / "adapter", dropout_run.out_dir / "adapter") <= 1e-6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive]


def test_ranks_stop_and_save_when_the_deepspeed_command_is_killed(assets, runs_root):
    """SIGTERM to the `deepspeed` command: its single-node runner dies without forwarding anything.
    The ranks notice, save and exit instead of training on as orphans."""
    import psutil

    out = runs_root / "orphaned"
    # No periodic checkpoints: the stop's own checkpoint is then the newest whenever the stop lands.
    base = dropout_config(assets, out)
    cfg = write_config(base | {"max_steps": 40, "checkpoint": dict(base["checkpoint"], every_steps=0)},
                       runs_root / "orphaned.yaml")
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    log = runs_root / "orphaned.log"
    with open(log, "w") as f:
        runner = subprocess.Popen([sys.executable, deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()),
                                   TRAIN, "--config", str(cfg)], env=launch_env(runs_root), cwd=REPO, stdout=f,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + RUN_TIMEOUT
        while not (read_metrics(out) and max(read_metrics(out)) >= 2):
            assert runner.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        ranks = [c.pid for c in psutil.Process(runner.pid).children(recursive=True)
                 if "train.py" in " ".join(c.cmdline()) and "deepspeed.launcher" not in " ".join(c.cmdline())]
        assert len(ranks) == 2, ranks
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        assert _wait_gone(ranks, 120) == [], "ranks kept running after their launcher died"
    finally:
        kill_group(runner, signal.SIGKILL)
    text = log.read_text()
    assert "launcher exited: saving at step" in text, text[-3000:]
    stopped = json.loads((out / "train_stopped.json").read_text())
    assert stopped["reason"] == "launcher exited" and stopped["exit"] == EXIT_RESUMABLE
    newest = list_checkpoints(str(out / "checkpoints"))[-1]
    assert newest.meta["reason"] == "launcher exited" and newest.step == stopped["step"] < 40
    assert verify_checkpoint(newest) is None
    assert not (out / "train_complete.json").exists() and not (out / "adapter").exists()


def test_a_killed_rank_ends_the_other_with_a_clear_error_within_the_timeout(assets, runs_root):
    """Ranks started directly (as srun does), so no launcher tears the survivor down: it must notice
    the dead peer by itself, within deepspeed.timeout_minutes (1 here)."""
    out = runs_root / "dead_rank"
    cfg = write_config(dropout_config(assets, out) | {"max_steps": 40}, runs_root / "dead_rank.yaml")
    log = runs_root / "dead_rank.log"
    procs = start_ranks(2, cfg, out, log)
    try:
        wait_for_step(out, 2, procs[0])
        procs[1].kill()
        t = time.time()
        procs[0].wait(timeout=60 + 60)  # the timeout, plus slack for 2 busy cores
        waited = time.time() - t
    finally:
        for p in procs:
            kill_group(p, signal.SIGKILL)
    text = open(f"{log}.rank0").read()
    assert procs[0].returncode == 1, text[-3000:]
    assert "[rank 0] lost another rank" in text and "Resume with --resume auto" in text, text[-3000:]
    assert waited < 90, waited
    assert not (out / "train_complete.json").exists()


@pytest.fixture
def small_tmpfs(tmp_path_factory):
    """A real tmpfs of a given size (needs root, as CI and this machine have)."""
    mounted = []

    def mount(size_bytes: int) -> Path:
        path = tmp_path_factory.mktemp("tmpfs")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        assert p.returncode == 0, f"cannot mount a tmpfs (the test needs root): {p.stderr}"
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_resumable(dropout_run, assets, runs_root,
                                                                            small_tmpfs):
    one = sum(p.stat().st_size + 4096 for p in (dropout_run.out_dir / "checkpoints" / "step_00000012").rglob("*"))
    disk = small_tmpfs(int(one * 1.5) // 4096 * 4096)  # room for the first checkpoint, not for a second
    out = runs_root / "full_disk"
    cfg = write_config(dropout_config(assets, out) | {"checkpoint": {"every_steps": 4, "keep_last": 2,
                                                                      "dir": str(disk)}},
                       runs_root / "full_disk.yaml")
    full = run_ranks(2, cfg, out)
    assert full.returncode == 2, full.output[-3000:]
    assert full.output.count("checkpoint error:") == 1, full.output[-3000:]
    assert "saving checkpoint step_00000008 failed: no space left on the device" in full.output, full.output[-3000:]
    assert f"the previous checkpoint {disk / 'step_00000004'} is intact" in full.output
    assert checkpoint_steps(disk) == [4] and not (disk / "step_00000008").exists()
    assert verify_checkpoint(list_checkpoints(str(disk))[0]) is None

    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    resumed = run_training(2, cfg, out, "--resume", "auto")
    assert_ok(resumed)
    assert f"resumed from {disk / 'step_00000004'}" in resumed.output
    assert_same_curve(resumed.metrics(), dropout_run.metrics())
    assert max_adapter_diff(out / "adapter", dropout_run.out_dir / "adapter") <= 1e-6


def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(dropout_run, assets, runs_root):
    out = runs_root / "killed_in_save"
    cfg = write_config(dropout_config(assets, out), runs_root / "killed_in_save.yaml")
    proc = start_training(2, cfg, out, runs_root / "killed_in_save.log")
    caught = None
    try:
        deadline = time.time() + RUN_TIMEOUT
        while caught is None and time.time() < deadline and proc.poll() is None:
            for step in (8, 12):
                d = out / "checkpoints" / f"step_{step:08d}"
                if d.is_dir() and not (d / "complete.json").exists():
                    kill_group(proc, signal.SIGSTOP)  # freeze every rank where it is, then look
                    if not (d / "complete.json").exists():
                        caught = step
                    kill_group(proc, signal.SIGKILL)
                    break
            time.sleep(0.001)
        proc.wait(timeout=30)
    finally:
        kill_group(proc, signal.SIGKILL)
    assert caught is not None, "no checkpoint write was caught in progress"
    partial = out / "checkpoints" / f"step_{caught:08d}"
    assert partial.is_dir() and not (partial / "complete.json").exists()
    previous = caught - 4

    resumed = run_training(2, cfg, out, "--resume", "auto")
    assert_ok(resumed)
    assert f"resumed from {out / 'checkpoints' / f'step_{previous:08d}'}" in resumed.output
    assert_same_curve(resumed.metrics(), dropout_run.metrics())
    assert max_adapter_diff(out / "adapter", dropout_run.out_dir / "adapter") <= 1e-6
