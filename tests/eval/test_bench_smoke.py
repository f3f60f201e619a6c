"""benchmarks/bench_eval_generate.py runs end to end at its tiny CPU size (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json

from .conftest import REPO


def test_bench_eval_generate_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_eval_generate", REPO / "benchmarks" / "bench_eval_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
