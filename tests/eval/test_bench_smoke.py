"""benchmarks/bench_eval_generate.py runs end to end at its tiny CPU size (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json

from .conftest import REPO


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_eval_generate", REPO / "benchmarks" / "bench_eval_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_eval_generate_tiny(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--tiny", "--eval-examples", "16", "--gen-batches", "1,2", "--new-tokens", "4",
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == list(bench.METHODS)
    for r in rows:
        assert r["eval"]["examples"] == 16 and r["eval"]["examples_per_s"] > 0
        assert [g["batch"] for g in r["generate"]] == [1, 2] and all(g["tokens_per_s"] > 0 for g in r["generate"])
    table = capsys.readouterr().out.strip().splitlines()[-len(rows) - 2:]
    assert table[0].startswith("| method | eval ex/s |") and len(table) == len(rows) + 2


def test_bench_interleaved_generation_tiny(tmp_path):
    """--interleave keeps every model and times the repeats round-robin: one time per repeat each."""
    bench = _load_bench()
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--tiny", "--skip-eval", "--methods", "base,mixlora", "--interleave", "--repeats", "3",
                       "--gen-batches", "1,2", "--new-tokens", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["base", "mixlora"] and all(r["interleaved"] for r in rows)
    for r in rows:
        assert "eval" not in r
        assert [len(g["all_seconds"]) for g in r["generate"]] == [3, 3]
