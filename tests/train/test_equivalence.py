"""2-rank ZeRO-3 training equals a single-process run: loss per step and the exported adapter."""

from __future__ import annotations

import pytest

from tests.train.conftest import (assert_ok, max_adapter_diff, read_eval, run_config, run_training,
                                  write_config)
from tests.train.oracle import oracle_run

pytestmark = pytest.mark.distributed


def test_two_rank_zero3_matches_plain_pytorch(reference_run, assets, tmp_path):
    cfg = run_config(assets, reference_run.out_dir)
    expected = oracle_run(cfg, export_dir=tmp_path / "oracle_adapter")
    got = reference_run.metrics()
    assert sorted(got) == list(range(1, cfg["max_steps"] + 1))
    diffs = [abs(got[s + 1]["loss"] - expected[s]) for s in range(len(expected))]
    assert max(diffs) <= 1e-5, list(zip(expected, [got[s]["loss"] for s in sorted(got)]))
    # The adapter really moved (B starts at zero), and the export matches the oracle's weights.
    assert expected[-1] < expected[0]
    assert max_adapter_diff(reference_run.out_dir / "adapter", tmp_path / "oracle_adapter") <= 1e-5


def test_single_process_launch_gives_the_same_curve(reference_run, assets, runs_root):
    """One process with 4-step accumulation reads the same global batches as 2 ranks x 2."""
    out = runs_root / "single"
    cfg = write_config(run_config(assets, out), runs_root / "single.yaml")
    result = run_training(1, cfg, out)
    assert_ok(result)
    a, b = result.metrics(), reference_run.metrics()
    assert sorted(a) == sorted(b)
    assert max(abs(a[s]["loss"] - b[s]["loss"]) for s in a) <= 1e-5
    assert max(abs(a[s]["grad_norm"] - b[s]["grad_norm"]) for s in a) <= 1e-5
    assert max_adapter_diff(out / "adapter", reference_run.out_dir / "adapter") <= 1e-5
    # Held-out loss: every rank scores its share, reduced over ranks.
    ea, eb = read_eval(out), read_eval(reference_run.out_dir)
    assert sorted(ea) == sorted(eb) == [4, 8]
    assert max(abs(ea[s] - eb[s]) for s in ea) <= 1e-5
