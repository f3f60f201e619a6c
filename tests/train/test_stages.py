"""ZeRO stages 0, 1, 2 and optimizer offload train the same as ZeRO-3 and the single-process oracle."""

from __future__ import annotations

import pytest

from tests.train.conftest import REPO, assert_ok, max_adapter_diff, run_config, run_training, write_config
from tests.train.oracle import oracle_run

pytestmark = pytest.mark.distributed

STEPS = 3
VARIANTS = {
    "stage0": {"zero_optimization": {"stage": 0}},
    "stage1": {"zero_optimization": {"stage": 1}},
    "stage2_offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    "stage3_offload": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
}


def short_config(assets, out, **changes):
    return run_config(assets, out, max_steps=STEPS, checkpoint__every_steps=0, eval__every_steps=0,
                      eval__at_end=False, **changes)


@pytest.fixture(scope="module")
def oracle(assets, runs_root, tmp_path_factory):
    export = tmp_path_factory.mktemp("stage_oracle") / "adapter"
    losses = oracle_run(short_config(assets, runs_root / "unused"), export_dir=export)
    return losses, export


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_stage_matches_oracle(variant, oracle, assets, runs_root):
    out = runs_root / variant
    cfg = write_config(short_config(assets, out, deepspeed__overrides=VARIANTS[variant]), runs_root / f"{variant}.yaml")
    result = run_training(2, cfg, out)
    assert_ok(result)
    stage = VARIANTS[variant]["zero_optimization"]["stage"]
    assert f"ZeRO stage {stage}" in result.output
    losses, export = oracle
    got = result.metrics()
    assert max(abs(got[s + 1]["loss"] - losses[s]) for s in range(STEPS)) <= 1e-5
    assert max_adapter_diff(out / "adapter", export) <= 1e-5


@pytest.mark.parametrize("shipped", ["zero2_bf16.json", "zero3_bf16.json"])
def test_shipped_gpu_configs_match_oracle(shipped, oracle, assets, runs_root):
    """The GPU configs as shipped (their lean settings: no overlap, no contiguous buckets, no bf16
    overflow check, persistent adapter tensors, plain linear) train like the oracle; on CPU their
    "auto" precision resolves to fp32."""
    out = runs_root / shipped.split(".")[0]
    cfg = write_config(short_config(assets, out, deepspeed__config=str(REPO / "ds_configs" / shipped)),
                       runs_root / f"{out.name}.yaml")
    result = run_training(2, cfg, out)
    assert_ok(result)
    losses, export = oracle
    got = result.metrics()
    assert max(abs(got[s + 1]["loss"] - losses[s]) for s in range(STEPS)) <= 1e-5
    assert max_adapter_diff(out / "adapter", export) <= 1e-5
