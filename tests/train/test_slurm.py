"""The Slurm job script on a real one-machine Slurm cluster (two fake nodes): 2 tasks on 2 nodes
train, a preemption signal saves and requeues the job, the requeued job resumes and finishes on
the uninterrupted run's loss curve.

Needs Debian's slurm-wlm and munge (``apt-get install --no-install-recommends slurm-wlm munge``);
without them the test is skipped with that reason, except where ``MIXLORA_REQUIRE_SLURM=1`` (CI
installs Slurm and sets it), where a missing Slurm fails the test instead.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from tests.train.conftest import REPO, dropout_config, launch_env, max_adapter_diff, read_metrics, write_config
from tests.train.test_resume import assert_same_curve

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons live in sbin
pytestmark = [
    pytest.mark.distributed, pytest.mark.slow,
    pytest.mark.skipif((shutil.which("slurmctld", path=SBIN_PATH) is None or shutil.which("munged", path=SBIN_PATH) is None)
                       and os.environ.get("MIXLORA_REQUIRE_SLURM") != "1",
                       reason="Slurm is not installed here: apt-get install --no-install-recommends slurm-wlm munge"),
]
CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    port = str(random.randint(17000, 19900))
    p = subprocess.run(["bash", str(CLUSTER), "start", str(d), port], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(d)], capture_output=True, timeout=120)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def job_info(env, job: str) -> dict[str, str]:
    """JobState, Restarts, ... from scontrol (finished jobs stay listed for MinJobAge, 300 s).
    A failed query (slurmctld busy) gives {} and the caller polls again."""
    p = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)


def wait_until(predicate, deadline: float, what: str, log) -> None:
    while not predicate():
        assert time.time() < deadline, f"{what}:\n{log.read_text()[-3000:] if log.exists() else ''}"
        time.sleep(0.2)


def test_sbatch_two_nodes_preempted_requeued_and_resumed(slurm, assets, runs_root, dropout_run):
    out = runs_root / "slurm"
    cfg = write_config(dropout_config(assets, out), runs_root / "slurm.yaml")
    env = dict(launch_env(runs_root), SLURM_CONF=slurm["SLURM_CONF"], MASTER_ADDR="127.0.0.1", PYTHON=sys.executable)
    log = runs_root / "slurm-%j.out"
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1", "--time", "10",
         "--output", str(log), "--export", "ALL", str(REPO / "launch" / "slurm" / "train.sbatch"), str(cfg)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    log = runs_root / f"slurm-{job_id}.out"
    try:
        deadline = time.time() + 360
        wait_until(lambda: read_metrics(out) and max(read_metrics(out)) >= 2, deadline, "no step 2", log)
        assert job_info(env, job_id).get("JobState") == "RUNNING", "job ended before the signal"
        # What Slurm's --signal=USR1@180 does before the time limit: USR1 to every task.
        subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=30)

        def requeued() -> bool:
            info = job_info(env, job_id)
            return info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) >= 1

        wait_until(requeued, deadline, "job not requeued", log)
        # The requeued job starts again by itself once its old credential expires (cred_expire).
        wait_until(lambda: job_info(env, job_id).get("JobState") in FINAL, deadline, "job did not finish", log)
    finally:
        subprocess.run(["scancel", job_id], env=env, timeout=30)
    assert job_info(env, job_id).get("JobState") == "COMPLETED"
    text = log.read_text()
    assert "restart 0: 2 nodes x 1 tasks" in text and "restart 1: 2 nodes x 1 tasks" in text, text[-3000:]
    assert "world 2" in text and "SIGUSR1 received" in text and "requeueing job" in text
    assert "resumed from" in text
    assert (out / "train_complete.json").is_file()
    assert_same_curve(read_metrics(out), dropout_run.metrics())
    assert max_adapter_diff(out / "adapter", dropout_run.out_dir / "adapter") <= 1e-6
