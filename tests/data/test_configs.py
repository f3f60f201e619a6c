"""The mixture files shipped in configs/data parse, name known tasks and settings, and the sample
mixture prepares the generated sample set."""

from __future__ import annotations

import shutil

import pytest

from data_prep.prepare import _SETTINGS
from mixlora_ds.data.sample_data import write_sample_data
from mixlora_ds.data.sources import load_mixture

from tests.data.conftest import REPO, load_manifest, run_prepare

CONFIGS = sorted((REPO / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_mixture_file_parses(path):
    sources, settings = load_mixture(path)
    assert sources and set(settings) <= _SETTINGS
    assert {s.split for s in sources} == {"train", "eval"}


def test_sample_mixture_prepares_the_sample_set(tmp_path, tokenizer_dir):
    (tmp_path / "configs" / "data").mkdir(parents=True)
    shutil.copy(REPO / "configs" / "data" / "sample.yaml", tmp_path / "configs" / "data")
    write_sample_data(tmp_path / "data" / "sample")
    out = tmp_path / "prepared"
    assert run_prepare("--mixture", tmp_path / "configs" / "data" / "sample.yaml", "--tokenizer",
                       tokenizer_dir, "--out", out) == 0
    m = load_manifest(out)
    assert m["seq_len"] == 256 and len(m["tasks"]) == 9
    assert m["splits"]["eval"]["examples"] == 8 * 60
