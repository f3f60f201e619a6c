"""Training checks that the prepared data fits the model before anything starts: the tokenizer the
data was prepared with is the model's, and every token id indexes the model's embedding."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import (REPO, TINY_MODEL, launch_env, run_config, train_cmd,
                                  write_config)


def model_dir_with_tokenizer(assets, tokenizer: Path, out: Path) -> Path:
    """The tiny base with a tokenizer saved beside its weights, as a released model has."""
    shutil.copytree(assets.base, out)
    for f in tokenizer.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def other_tokenizer(assets, tmp_path_factory) -> Path:
    """Another tokenizer with the same vocabulary size, trained on other text (Llama-2 vs Mistral)."""
    from transformers import AutoTokenizer

    from data_prep.build_tokenizer import build_tokenizer

    text = tmp_path_factory.mktemp("other_text") / "text.txt"
    words = [f"{a}{b}{c}" for a in "bcdfg" for b in "aeiou" for c in "klmnprstvz"]
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) + "\n")
    size = len(AutoTokenizer.from_pretrained(str(assets.tokenizer)))
    out = build_tokenizer([assets.sample, text], tmp_path_factory.mktemp("other_tok") / "tok", size, num_threads=1)
    assert len(AutoTokenizer.from_pretrained(str(out))) == size
    return out


def validate(assets, tmp_path, *extra: str, **changes) -> subprocess.CompletedProcess:
    cfg = write_config(run_config(assets, tmp_path / "run", **changes), tmp_path / "run.yaml")
    return subprocess.run(train_cmd(1, cfg, "--validate-only", *extra), env=launch_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def make_plan_for(assets, tmp_path, **changes):
    from mixlora_ds.train.config import load_config
    from mixlora_ds.train.plan import make_plan

    cfg = write_config(run_config(assets, tmp_path / "run", **changes), tmp_path / "run.yaml")
    return make_plan(load_config(str(cfg)), world_size=2, device="cpu")


def test_other_tokenizer_of_the_same_size_is_refused_under_validate_only(assets, other_tokenizer, tmp_path):
    model = model_dir_with_tokenizer(assets, other_tokenizer, tmp_path / "model")
    p = validate(assets, tmp_path, model__name_or_path=str(model))
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr
    assert "run.yaml:" in err
    assert f"data.train_dir='{assets.data}' was prepared with tokenizer {assets.tokenizer}" in err
    assert f"the model's tokenizer (model.name_or_path) is {model}" in err
    assert err.count("fingerprint") >= 2 and "different token ids" in err
    assert f"--tokenizer {model}" in err and "data.allow_tokenizer_mismatch: true" in err
    # Accepted on purpose: the run validates, with a warning that names both tokenizers.
    ok = validate(assets, tmp_path, "--data.allow_tokenizer_mismatch", "true", model__name_or_path=str(model))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout and "training anyway (data.allow_tokenizer_mismatch is true)" in ok.stderr
    assert str(assets.tokenizer) in ok.stderr and str(model) in ok.stderr


def test_model_tokenizer_key_is_checked_too(assets, other_tokenizer, tmp_path):
    from mixlora_ds.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"the model's tokenizer \(model.tokenizer\) is .*other_tok"):
        make_plan_for(assets, tmp_path, model__tokenizer=str(other_tokenizer))


def test_same_tokenizer_saved_again_passes(assets, tmp_path):
    """The model's copy of the data's tokenizer, saved again by transformers (other file bytes)."""
    from transformers import AutoTokenizer

    resaved = tmp_path / "resaved"
    AutoTokenizer.from_pretrained(str(assets.tokenizer)).save_pretrained(str(resaved))
    model = model_dir_with_tokenizer(assets, resaved, tmp_path / "model")
    plan = make_plan_for(assets, tmp_path, model__name_or_path=str(model))
    assert plan.total_steps == 8


def true_max_token_id(data_dir: Path, split: str) -> int:
    return max(int(np.load(f).max()) for f in sorted((data_dir / split).glob("*/input_ids.npy")))


@pytest.mark.parametrize("manifest_kind", ["current", "without_max_token_id"])
def test_token_ids_past_the_embedding_are_refused(assets, tmp_path, manifest_kind):
    from mixlora_ds.train.config import TrainConfigError

    data = assets.data
    manifest = json.loads((data / "manifest.json").read_text())
    largest = true_max_token_id(data, "train")
    assert manifest["splits"]["train"]["max_token_id"] == largest
    if manifest_kind == "without_max_token_id":  # written by an earlier version of prepare
        data = tmp_path / "old_data"
        shutil.copytree(assets.data, data)
        for split in manifest["splits"].values():
            split.pop("max_token_id")
            for shard in split["shards"]:
                shard.pop("max_token_id")
        (data / "manifest.json").write_text(json.dumps(manifest))
    small = dict(TINY_MODEL, vocab_size=largest)  # one row short
    with pytest.raises(TrainConfigError) as e:
        make_plan_for(assets, tmp_path, model__name_or_path=None, model__config=small, data__train_dir=str(data),
                      data__allow_tokenizer_mismatch=True)
    msg = str(e.value)
    assert f"the largest token id is {largest}" in msg and f"embedding has {largest} rows (vocab_size)" in msg
    assert "run.yaml:" in msg and "data.train_dir" in msg and str(assets.tokenizer) in msg
    assert f"vocab_size >= {largest + 1}" in msg
    # One more row is enough.
    plan = make_plan_for(assets, tmp_path, model__name_or_path=None, model__config=dict(small, vocab_size=largest + 1),
                         data__train_dir=str(data))
    assert plan.total_steps == 8


def test_eval_data_prepared_with_another_tokenizer_is_refused(assets, other_tokenizer, tmp_path):
    """A model without a tokenizer (random weights from a config): held-out data must match the training data."""
    from data_prep.prepare import main as prepare_main
    from mixlora_ds.train.config import TrainConfigError

    eval_dir = tmp_path / "eval_data"
    train_file = assets.sample / "arc-e" / "train.jsonl"
    assert prepare_main(["--input", f"{train_file}:arc-e", "--eval-input", f"{train_file}:arc-e",
                         "--tokenizer", str(other_tokenizer), "--seq-len", "128", "--out", str(eval_dir),
                         "--no-progress"]) == 0
    with pytest.raises(TrainConfigError, match=r"data.eval_dir=.* was prepared with tokenizer .*other_tok.*"
                                               r"but the tokenizer of data.train_dir is"):
        make_plan_for(assets, tmp_path, model__name_or_path=None, model__config=dict(TINY_MODEL),
                      data__eval_dir=str(eval_dir))
