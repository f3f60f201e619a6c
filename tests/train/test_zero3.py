"""Under ZeRO-3 the frozen base is really partitioned and only router / LoRA parameters get gradients,
whoever shards it: mixlora_ds (per decoder layer, the default) or DeepSpeed's stage-3 engine."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.train.conftest import REPO, RUN_TIMEOUT, launch_env, run_config, write_config

pytestmark = pytest.mark.distributed

ADAPTER_PARAM = re.compile(r"(\.lora_A\.|\.lora_B\.|\.experts\.[a-z_]+\.lora_[AB]$|\.router\.weight$|lora_magnitude)")
IMPLS = ("mixlora_ds", "deepspeed")


@pytest.fixture(scope="module", params=IMPLS)
def probe(request, assets, runs_root):
    impl = request.param
    out = runs_root / f"probe_{impl}"
    out.mkdir(exist_ok=True)
    cfg = write_config(run_config(assets, out, deepspeed__zero3_impl=impl), runs_root / f"probe_{impl}.yaml")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "tests" / "train" / "zero3_probe.py"), str(cfg), str(out)],
                       env=launch_env(runs_root), cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    reports = [json.loads((out / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["impl"] == impl for r in reports)
    return reports


def test_base_weights_are_partitioned_from_construction(probe):
    for report in probe:
        for when in ("frozen_before", "frozen_after"):
            pieces = report[when]
            assert pieces, "no partitioned frozen piece found"
            held = sum(local for local, _ in pieces.values())
            full = sum(total for _, total in pieces.values())
            # Each rank holds about half of every piece (padding rounds partitions up).
            assert 0.45 * full <= held <= 0.55 * full, (when, held, full)
            for name, (local, total) in pieces.items():
                assert local < total, f"{name} is whole on rank {report['rank']} ({when})"
    assert probe[0]["frozen_after"].keys() == probe[1]["frozen_after"].keys()


def test_resharding_gathers_one_unit_at_a_time_and_the_engine_keeps_the_views(probe):
    """mixlora_ds re-shards the zero.Init-partitioned base one unit (layer, or the outer weights) at a
    time, so no rank ever holds the whole base; DeepSpeed's engine start-up re-points none of the
    sharded parameters away from their flat buffers."""
    for report in probe:
        s = report["sharding"]
        if report["impl"] == "deepspeed":
            assert s is None
            continue
        assert s["views_of_shards"]
        assert 0 < s["whole_peak_bytes"] <= s["largest_unit_bytes"] < s["base_bytes"], s
        # Between steps only what the next forward needs first stays gathered (one layer ahead).
        assert s["gathered_before"] == [], s
        assert s["gathered_after"] == ["layer 0", "outer"], s


def test_only_router_and_lora_parameters_train_and_get_gradients(probe):
    report = probe[0]
    assert report["trainable"], "nothing trainable"
    for name in report["trainable"]:
        assert ADAPTER_PARAM.search(name), f"unexpected trainable parameter {name}"
    assert any(".router." in n for n in report["trainable"])
    assert any(".experts." in n for n in report["trainable"])
    for name, g in report["grads"].items():
        if name in report["trainable"]:
            assert g is not None and g > 0, f"no gradient for adapter parameter {name}"
        else:
            assert g is None, f"frozen parameter {name} received a gradient"


def test_moe_blocks_are_zero3_leaf_modules_under_deepspeeds_engine(probe):
    """DeepSpeed's engine needs every rank to gather the same modules: the MoE block is one leaf.
    mixlora_ds gathers whole decoder layers, so it needs no leaf marking."""
    leaf = probe[0]["leaf_blocks"]
    assert leaf
    assert all(leaf) if probe[0]["impl"] == "deepspeed" else not any(leaf)
