"""README's main job: launch/demo.sh runs data -> 2-rank deepspeed training -> adapter -> evaluation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.train.conftest import REPO, launch_env, read_eval, read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_script_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = launch_env(tmp_path)
    env.update(EPOCHS="1", STEPS="30", MASTER_PORT=str(free_port()))
    del env["DS_ACCELERATOR"]  # the demo picks the accelerator itself
    p = subprocess.run(["bash", str(REPO / "launch" / "demo.sh"), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "ZeRO stage 3" in log and "world 2" in log  # the deepspeed launcher really ran 2 ranks
    assert "2 ranks on cpu" in log  # no GPU on the test machines
    run = out / "run"
    assert (run / "train_complete.json").is_file()
    assert {"adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"} <= {
        f.name for f in (run / "adapter").iterdir()}
    metrics = read_metrics(run)
    first, last = metrics[min(metrics)], metrics[max(metrics)]
    assert last["loss"] < first["loss"]
    evals = read_eval(run)
    assert evals and min(evals.values()) < first["ce_loss"]
    base = json.loads((out / "eval_base.json").read_text())
    tuned = json.loads((out / "eval_adapter.json").read_text())
    assert base and tuned
    assert "| mixlora |" in (out / "eval_adapter.md").read_text()


def detect(python: str = sys.executable, **preset: str) -> tuple[str, str]:
    """DS_ACCELERATOR and NPROC as scripts/detect_accelerator.sh sets them (demo.sh sources it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "NPROC")}
    env.update(PYTHON=python, **preset)
    out = subprocess.run(["bash", "-c", '. scripts/detect_accelerator.sh; echo "$DS_ACCELERATOR $NPROC"'],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return out[0], out[1]


def test_accelerator_detection_on_this_machine():
    """The GPUs torch sees, one rank each; 2 CPU ranks without any; explicit settings are kept."""
    import torch

    if torch.cuda.is_available():
        assert detect() == ("cuda", str(torch.cuda.device_count()))
    else:
        assert detect() == ("cpu", "2")
    assert detect(DS_ACCELERATOR="cpu", NPROC="3") == ("cpu", "3")


def test_accelerator_detection_branches_on_the_gpu_count(tmp_path):
    """The script's GPU branch, with an interpreter that reports GPUs (this machine has none)."""
    fake = tmp_path / "python_with_gpus"
    fake.write_text("#!/bin/sh\necho 4\n")
    fake.chmod(0o755)
    assert detect(str(fake)) == ("cuda", "4")
    assert detect(str(fake), NPROC="1") == ("cuda", "1")
    assert detect(str(fake), DS_ACCELERATOR="cpu") == ("cpu", "2")
    broken = tmp_path / "python_without_torch"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert detect(str(broken)) == ("cpu", "2")
