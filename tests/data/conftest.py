"""Fixtures for the data-layer tests: the project's sample set, a tiny tokenizer built from it,
and a prepared directory, each built once per test session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_prep.build_tokenizer import build_tokenizer
from data_prep.prepare import main as prepare_main
from mixlora_ds.data.sample_data import write_sample_data

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 256


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sample")
    return {"dir": out, "paths": write_sample_data(out)}


@pytest.fixture(scope="session")
def tokenizer_dir(sample, tmp_path_factory) -> Path:
    # Small vocabulary: fast to build, and multi-token answers exercise the masking.
    return build_tokenizer([str(sample["dir"])], tmp_path_factory.mktemp("tok") / "tokenizer", 400,
                           num_threads=1)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def run_prepare(*args: Any) -> int:
    """The CLI in-process (no interpreter start-up per call)."""
    return prepare_main([*map(str, args), "--no-progress"])


@pytest.fixture(scope="session")
def prepared(sample, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    code = run_prepare("--mixture", sample["dir"] / "mixture.yaml", "--tokenizer", tokenizer_dir,
                       "--seq-len", SEQ_LEN, "--out", out)
    assert code == 0
    return out


def read_records(path: Path) -> list[Any]:
    """Records of a JSON Lines or JSON-array file, in order (ordinal = index)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_manifest(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / "manifest.json").read_text())


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}
