"""The frozen base sharded per decoder layer (``mixlora_ds.parallel``) computes exactly what the
unsharded model computes, holds half of it on each of 2 ranks, and frees what it gathers but what
the next forward needs first.

One real 2-rank torchrun launch (gloo) runs ``shard_probe.py``; the tests read its reports. On a
machine with 2 GPUs, ``MIXLORA_PROBE_DEVICE=cuda`` runs the probe on them with NCCL instead, where
the gathers really are asynchronous.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "parallel" / "shard_probe.py"
TOL = 1e-5  # fp32; the same kernels run on the same values, so differences are rounding at most

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard_probe")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(out / "inductor"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    device = os.environ.get("MIXLORA_PROBE_DEVICE", "cpu")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(PROBE), str(out), "--device", device], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_sharded_model_equals_unsharded_in_forward_backward_and_eval(reports):
    for report in reports:
        assert len(report["cases"]) == (18 if report["device"] == "cuda" else 16)
        for name, case in report["cases"].items():
            for i, s in enumerate(case["steps"]):
                where = f"rank {report['rank']}, {name}, step {i}"
                assert s["logits"] <= TOL and s["loss"] <= TOL, where
                assert s["grads"] <= TOL, where
                assert s["grad_size"] > 1e-4, f"{where}: the gradients compared are all ~zero"
            assert case["eval_logits"] <= TOL, name


def kept_for_next_forward(prefetch_layers: int, layers: int = 4) -> list[str]:
    """What a training step leaves gathered: what the next forward needs first."""
    return sorted(["outer"] + [f"layer {j}" for j in range(min(prefetch_layers, layers))])


def test_each_rank_holds_half_and_keeps_only_what_the_next_forward_needs_first(reports):
    for report in reports:
        for name, case in report["cases"].items():
            # Half, plus the padding that starts every parameter on a 128-byte boundary.
            assert 0.5 * case["full"] <= case["held"] <= 0.52 * case["full"], (name, case["held"], case["full"])
            kept = kept_for_next_forward(case["prefetch_layers"])
            assert all(s["holding_after"] == kept for s in case["steps"]), (name, case["steps"][-1]["holding_after"])
            assert case["holding_after_eval"] == [], name


def test_at_most_the_running_layer_and_the_prefetched_ones_hold_memory(reports):
    """The layer that runs and the ones in flight (one by default, none without prefetching, two
    with ``prefetch_layers=2``, all 4 when it exceeds the layers), in forward and in backward alike:
    a layer's weights are freed as soon as its backward is done."""
    for report in reports:
        for name, case in report["cases"].items():
            assert case["layers"] == 4
            most = {"no prefetch": 1, "prefetch 2": 3, "prefetch past the last layer": 4}.get(name, 2)
            assert case["peak_layers_forward"] == most, (name, case["peak_layers_forward"])
            assert case["peak_layers_backward"] == most, (name, case["peak_layers_backward"])


def test_gathers_use_the_transport_asked_for(reports):
    for report in reports:
        for name, case in report["cases"].items():
            assert case["transport"] == ("copy_engine" if name.startswith("copy engine") else "nccl"), name


def test_other_orders_of_forward_and_backward(reports):
    """An evaluation forward between a forward and its backward (it frees the LM head), a second
    backward through a retained graph, two forwards then two backwards: all give the unsharded
    gradients and leave gathered only what the next forward needs first."""
    for report in reports:
        orders = report["call_orders"]
        assert sorted(orders) == ["backward_twice", "eval_forward_between", "two_forwards_two_backwards"]
        for name, r in orders.items():
            assert r["grads"] <= TOL, (report["rank"], name)
            assert r["holding_after"] == kept_for_next_forward(1), (report["rank"], name)


def test_frozen_weights_cast_to_one_dtype(reports):
    for report in reports:
        assert report["cast"]["frozen_dtypes"] == ["torch.float32"]
        assert report["cast"]["grads"] <= TOL


def test_gathered_context_reads_sharded_weights_and_frees_them(reports):
    for report in reports:
        g = report["gathered"]
        assert g["inside"] == 0.0
        assert g["freed_after"] and g["storage_after"] == 0
        assert "read-only" in g["write_refused"]
