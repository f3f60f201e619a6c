"""benchmarks/bench_zero.py runs (tiny model, CPU, gloo): the GPU benchmark's code path stays alive."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.train.conftest import REPO, launch_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_bench_zero_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench.jsonl"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_zero.py"), "sweep", "--model", "tiny",
                        "--gpus", "1,2", "--cases", "plain,zero3", "--adapters", "mixlora", "--steps", "1",
                        "--warmup", "1", "--micro", "1", "--seq", "64", "--out", str(out), "--workdir", str(tmp_path),
                        "--timeout", "240"],
                       env=launch_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["case"], r["world"]) for r in rows] == [("plain", 1), ("zero3", 1), ("zero3", 2)]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s_per_gpu"] > 0 and r["peak_mem_gb"] > 0 and r["trainable"] > 0
    assert "x plain" in p.stdout  # the summary table
