"""benchmarks/bench_zero.py, bench_train_step.py and bench_router_losses.py run (tiny model, CPU,
gloo): the GPU benchmarks' code paths stay alive."""

from __future__ import annotations

import gzip
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
                        "--timeout", "240", "--trace", str(tmp_path / "traces")],
                       env=launch_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["case"], r["world"]) for r in rows] == [("plain", 1), ("zero3", 1), ("zero3", 2)]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s_per_gpu"] > 0 and r["peak_mem_gb"] > 0 and r["trainable"] > 0
    assert "x plain" in p.stdout  # the summary table
    traces = sorted(f.name for f in (tmp_path / "traces").iterdir())
    assert traces == ["trace_plain_mixlora_w1_r0.json.gz", "trace_zero3_mixlora_w1_r0.json.gz",
                      "trace_zero3_mixlora_w2_r0.json.gz", "trace_zero3_mixlora_w2_r1.json.gz"]
    with gzip.open(tmp_path / "traces" / traces[-1], "rt") as f:
        assert any(e.get("ph") == "X" for e in json.load(f)["traceEvents"])


def test_bench_train_step_tiny_on_cpu(tmp_path):
    """Every kind of variant, CUDA-graph ones included (on CPU Inductor runs them without graphs and
    the script says so)."""
    variants = ["base", "peft-lora-compiled", "mixlora_ds-bf16-fused-compiled", "mixlora_ds-bf16-fused-compiled-graphs"]
    out = tmp_path / "step.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--tiny", "--variants",
                        ",".join(variants), "--json", str(out)],
                       env=launch_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == variants
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[1]["trainable_params"] > 0 and rows[2]["trainable_params"] == rows[3]["trainable_params"] > 0
    assert rows[3]["cudagraph_skips"] > 0 and "without CUDA graphs" in p.stdout


@pytest.mark.parametrize("strategy", ["top-k", "switch"])
def test_bench_router_losses_small_on_cpu(tmp_path, strategy):
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_router_losses.py"), "--layers", "3",
                        "--tokens", "64", "--seq", "32", "--repeats", "2", "--strategy", strategy, "--device", "cpu"],
                       env=launch_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "operators per micro-batch, views apart: " in p.stdout and "host time per micro-batch" in p.stdout


def test_trace_summary_splits_gpu_time(tmp_path):
    """Compute kernels at 0-100 and 150-250 us, an all-gather at 80-180 us: 50 us of it while the
    compute stream idles (100-150), one idle gap; a side-stream copy at 120-170 us, 30 us of it in
    that gap; a copy on the compute stream counts as compute. On the host, compiled layer calls
    at 0-10, 30-40 and 100-110 us (forward; 20 and 60 us between them) and one in backward."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from trace_summary import summarize

    def kernel(name, ts, dur, stream):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    events = [kernel("gemm", 0, 100, 7), kernel("gemm", 150, 100, 7),
              kernel("ncclDevKernel_AllGather_RING_LL", 80, 100, 20),
              dict(kernel("Memcpy DtoD (Device -> Device)", 120, 50, 30), cat="gpu_memcpy"),
              dict(kernel("Memcpy DtoD (Device -> Device)", 0, 10, 7), cat="gpu_memcpy"),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 400}]
    events += [{"ph": "X", "cat": "cpu_op", "name": "Torch-Compiled Region: 0/0", "ts": ts, "dur": 10}
               for ts in (0, 30, 100)]
    events.append({"ph": "X", "cat": "cpu_op", "name": "CompiledFunctionBackward", "ts": 200, "dur": 10})
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(str(path), steps=1, gaps=5)
    assert s["compute_stream"] == 7
    assert s["span_ms_per_step"] == 0.25 and s["compute_busy_ms_per_step"] == 0.2
    assert s["nccl_by_kind_ms_per_step"] == {"AllGather": 0.1}
    assert s["nccl_while_compute_idle_ms_per_step"] == 0.05 and s["compute_idle_ms_per_step"] == 0.05
    assert s["side_stream_copies_ms_per_step"] == 0.05
    assert s["side_stream_copies_while_compute_idle_ms_per_step"] == 0.03
    assert s["largest_idle_gaps"] == [{"at_ms": 0.1, "ms": 0.05, "during": ["AllGather", "copy"]}]
    assert s["compute_idle_without_communication_ms_per_step"] == 0.0
    assert s["host_us_between_compiled_layers"] == {"forward": 60.0, "backward": None}
