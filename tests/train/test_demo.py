"""README's main job: launch/demo.sh runs data -> 2-rank deepspeed training -> adapter -> evaluation."""

from __future__ import annotations

import json
import socket
import subprocess

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
    p = subprocess.run(["bash", str(REPO / "launch" / "demo.sh"), str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    assert "ZeRO stage 3" in log and "world 2" in log  # the deepspeed launcher really ran 2 ranks
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
