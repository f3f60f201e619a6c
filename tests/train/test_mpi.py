"""``mpirun -np 2 python launch/train.py`` trains like the other launchers: ranks and rendezvous come
from Open MPI's variables, and the run matches the same config started by torchrun step for step.

Needs Debian's openmpi-bin (``apt-get install --no-install-recommends openmpi-bin``); without it the
test is skipped with that reason, except where ``MIXLORA_REQUIRE_MPI=1`` (CI installs Open MPI and
sets it), where a missing mpirun fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mixlora_ds import dist
from tests.train.conftest import (REPO, RUN_TIMEOUT, TRAIN, assert_ok, launch_env, max_adapter_diff,
                                  read_metrics, run_config, write_config)


def test_open_mpi_variables_map_to_the_rendezvous():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_MCA_ess_base_jobid": "1129250817"}
    assert dist.map_mpi_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(20000 + 1129250817 % 20000)}
    # A launcher's own variables are never overridden.
    assert dist.map_mpi_env({"RANK": "0", "OMPI_COMM_WORLD_RANK": "1"}) == {}
    # MPICH / Intel MPI; a MASTER_ADDR given with mpirun -x is kept.
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29555"}
    assert dist.map_mpi_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


def test_ranks_on_several_nodes_without_mpi4py_or_master_addr_fail_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(RuntimeError, match=r"install mpi4py .*or pass it: mpirun -x MASTER_ADDR="):
        dist.map_mpi_env(env)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None and os.environ.get("MIXLORA_REQUIRE_MPI") != "1",
                    reason="Open MPI is not installed here: apt-get install --no-install-recommends openmpi-bin")
def test_mpirun_two_ranks_match_torchrun(assets, runs_root, reference_run):
    out = runs_root / "mpirun"
    config = write_config(run_config(assets, out), runs_root / "mpirun.yaml")
    env = launch_env(runs_root)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "-np", "2", "--oversubscribe", sys.executable, TRAIN, "--config", str(config)]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)

    class Result:
        returncode, output = p.returncode, p.stdout + p.stderr

    assert_ok(Result)
    assert "world 2, grad accum 2" in Result.output
    mine, ref = read_metrics(out), reference_run.metrics()
    assert sorted(mine) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert mine[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-7), step
    assert max_adapter_diff(out / "adapter", reference_run.out_dir / "adapter") < 1e-6
