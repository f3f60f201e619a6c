"""build_tokenizer.py says when the vocabulary it built is smaller than the one asked for."""

from __future__ import annotations

import re

from data_prep.build_tokenizer import main as build_main


def test_vocabulary_shortfall_is_reported_with_both_sizes(tmp_path, sample, capsys):
    from transformers import AutoTokenizer

    corpus = sample["paths"]["boolq"]["train"]
    assert build_main(["--input", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "4096"]) == 0
    got = len(AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    assert got < 4096
    err = capsys.readouterr().err
    assert re.search(rf"warning: .*tok: requested a vocabulary of 4096 tokens, got {got}: ", err), err
    assert "more or more varied text" in err


def test_no_warning_when_the_vocabulary_is_reached(tmp_path, sample, capsys):
    from transformers import AutoTokenizer

    corpus = sample["paths"]["boolq"]["train"]
    assert build_main(["--input", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "tok"))) == 300
    assert "warning" not in capsys.readouterr().err
