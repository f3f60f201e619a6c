"""Evaluation on the project's own pieces: sample data, the sentencepiece tokenizer, a tiny base.

That tokenizer (512 pieces) splits " true" into several pieces and digits into "▁" + digit, as
LLaMA's does for digits: the reference's label-logit scoring then reads the wrong logits for those
labels, which the evaluator warns about, and label-loglik scoring gets right.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from mixlora_ds.data.prompt_batch import encode_prompt
from mixlora_ds.data.tokenizer_io import load_tokenizer
from mixlora_ds.eval import BUILTIN_TASKS, EvalOptions, evaluate_task, find_task_file, load_task
from mixlora_ds.inference import load_for_inference
from mixlora_ds.model.presets import build_model_from_config

from .conftest import TINY, make_adapter


@pytest.fixture(scope="module")
def project_setup(tmp_path_factory, project_tok_dir):
    tok = load_tokenizer(project_tok_dir)
    base = tmp_path_factory.mktemp("pbase")
    build_model_from_config(dict(TINY, vocab_size=len(tok)), seed=42).save_pretrained(base)
    for f in project_tok_dir.iterdir():
        shutil.copy(f, base)
    adapter = make_adapter(base, tmp_path_factory.mktemp("padapter") / "mixlora")
    model, tok = load_for_inference(base, adapter=adapter, dtype="float32", device="cpu")
    return base, adapter, model, tok


def test_multi_token_labels_are_flagged_and_scored_exactly(project_setup, sample_dir):
    _, _, model, tok = project_setup
    task = load_task("boolq", find_task_file(sample_dir, "boolq", "eval"))
    assert len(tok.encode(" true", add_special_tokens=False)) > 1
    with pytest.warns(UserWarning, match=r"labels \['true', 'false'\] are not single tokens"):
        evaluate_task(model, tok, task, EvalOptions(progress=False))
    res = evaluate_task(model, tok, task, EvalOptions(scoring="label-loglik", batch_size=3, progress=False))
    with torch.inference_mode():
        for ex, pred in zip(task.examples, res.predictions):
            best, best_lp = None, None
            for label in ex.labels:
                ctx = encode_prompt(tok, ex.prompt)
                whole = encode_prompt(tok, ex.prompt + " " + label)
                assert whole[: len(ctx)] == ctx
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
                lp = sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
                if best_lp is None or lp > best_lp:
                    best, best_lp = label, lp
            assert pred == best


def test_label_loglik_equals_label_logits_for_single_token_labels(mixlora_model, tokenizer, data_dir):
    """With one token per label, the log-likelihood ranking is the logit ranking."""
    for name in ("obqa", "piqa", "siqa"):
        task = load_task(name, find_task_file(data_dir, name, "eval"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no label-token warning for this tokenizer
            a = evaluate_task(mixlora_model, tokenizer, task, EvalOptions(progress=False))
        b = evaluate_task(mixlora_model, tokenizer, task, EvalOptions(scoring="label-loglik", progress=False))
        assert a.predictions == b.predictions


def test_sample_data_accuracy_table_via_cli(project_setup, sample_dir, tmp_path):
    """The README's main path: sample data, project tokenizer, tiny base + adapter -> a table."""
    from .test_cli import _evaluate_main

    base, adapter, _, _ = project_setup
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = _evaluate_main()(["--base-model", str(base), "--adapter", str(adapter), "--data-dir", str(sample_dir),
                           "--tasks", ",".join(BUILTIN_TASKS), "--scoring", "label-loglik", "--corrected",
                           "--output", str(out), "--markdown", str(md), "--no-progress", "--method", "MixLoRA"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["tasks"]) == set(BUILTIN_TASKS)
    assert all(doc["tasks"][t]["n"] == 16 for t in BUILTIN_TASKS)
    assert md.read_text().splitlines()[0] == (
        "| Method | ARC-e | ARC-c | BoolQ | OBQA | PIQA | SIQA | HellaS | WinoG | AVG |")
    assert doc["meta"]["per_record_labels"] and doc["meta"]["boolq_passage"] and doc["meta"]["truncation"] == "left"
