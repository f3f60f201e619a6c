"""The paper's other methods under ZeRO-3 (LoRA and DoRA baselines, MixDoRA) train exactly as in a
single process."""

from __future__ import annotations

import pytest

from tests.train.conftest import MIXLORA, assert_ok, max_adapter_diff, run_config, run_training, write_config
from tests.train.oracle import oracle_run

pytestmark = pytest.mark.distributed

STEPS = 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS},
    "dora": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "use_dora": True,
             "target_modules": TARGETS},
    "mixdora": dict(MIXLORA, use_dora=True),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_under_zero3_matches_oracle(name, assets, runs_root, tmp_path):
    out = runs_root / f"adapter_{name}"
    cfg = run_config(assets, out, max_steps=STEPS, checkpoint__every_steps=0, eval__every_steps=0,
                     eval__at_end=False, adapter=ADAPTERS[name])
    result = run_training(2, write_config(cfg, runs_root / f"adapter_{name}.yaml"), out)
    assert_ok(result)
    expected = oracle_run(cfg, export_dir=tmp_path / "oracle")
    got = result.metrics()
    assert max(abs(got[s + 1]["loss"] - expected[s]) for s in range(STEPS)) <= 1e-5
    assert max_adapter_diff(out / "adapter", tmp_path / "oracle") <= 1e-5
    if ADAPTERS[name]["peft_type"] == "LORA":  # no MoE: the aux loss is exactly zero
        assert all(got[s]["aux_loss"] == 0.0 for s in got)
