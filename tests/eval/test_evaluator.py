"""The evaluation loop: determinism, batching, padding, variants, expert-load statistics, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mixlora_ds.data.templates import TASKS
from mixlora_ds.eval import BUILTIN_TASKS, EvalOptions, TaskError, evaluate_task, find_task_file, load_task
from mixlora_ds.data.prompt_batch import encode_prompt, pad_batch
from mixlora_ds.model.stats import routing_statistics

from .conftest import task_records, write_jsonl


def _opts(**kw) -> EvalOptions:
    return EvalOptions(**{"progress": False, **kw})


@pytest.fixture(scope="module")
def arc(data_dir):
    return load_task("arc-c", find_task_file(data_dir, "arc-c", "eval"))


def test_every_builtin_task_evaluates(mixlora_model, tokenizer, data_dir):
    for name in BUILTIN_TASKS:
        task = load_task(name, find_task_file(data_dir, name, "eval"))
        res = evaluate_task(mixlora_model, tokenizer, task, _opts(batch_size=5))
        assert res.n == 12 and 0 <= res.correct <= 12
        assert len(res.predictions) == 12
        assert all(p in TASKS[name].labels for p in res.predictions)
        assert res.expert_load is not None and res.expert_load["layers"] == 2


def test_deterministic_with_dropout_configured(base_dir, mixlora_dir, mixlora_model, tokenizer, arc):
    """The adapter was saved with lora_dropout 0.3: evaluation must run with dropout off. The model
    is loaded unmerged, so every LoRA keeps its dropout (and the shared prepared model is left alone)."""
    from mixlora_ds.inference import load_for_inference

    model, _ = load_for_inference(base_dir, adapter=mixlora_dir, dtype="float32", device="cpu", merge_lora=False)
    assert model.mixlora_config.lora_dropout == 0.3
    model.train()  # evaluate_task must switch to eval itself, and restore the mode after
    a = evaluate_task(model, tokenizer, arc, _opts(batch_size=4))
    assert model.training
    model.eval()
    b = evaluate_task(model, tokenizer, arc, _opts(batch_size=4))
    assert a.predictions == b.predictions and a.correct == b.correct
    assert a.expert_load == b.expert_load
    # The merged and fused model (rounded differently, in fp32) predicts and routes the same.
    c = evaluate_task(mixlora_model, tokenizer, arc, _opts(batch_size=4))
    assert c.predictions == a.predictions and c.expert_load["counts"] == a.expert_load["counts"]


def test_batched_equals_one_by_one_and_padding_side_irrelevant(mixlora_model, tokenizer, arc):
    ref = evaluate_task(mixlora_model, tokenizer, arc, _opts(batch_size=1))
    for bs in (3, 16):
        for side in ("left", "right"):
            got = evaluate_task(mixlora_model, tokenizer, arc, _opts(batch_size=bs, padding_side=side))
            assert got.predictions == ref.predictions, (bs, side)
            assert got.expert_load["counts"] == ref.expert_load["counts"], (bs, side)


def test_result_independent_of_example_order(mixlora_model, tokenizer, tmp_path):
    recs = task_records("siqa", 10, seed=4)
    fwd = load_task("siqa", write_jsonl(tmp_path / "a.jsonl", recs))
    rev = load_task("siqa", write_jsonl(tmp_path / "b.jsonl", recs[::-1]))
    a = evaluate_task(mixlora_model, tokenizer, fwd, _opts(batch_size=3))
    b = evaluate_task(mixlora_model, tokenizer, rev, _opts(batch_size=3))
    assert a.predictions == b.predictions[::-1]


def test_expert_load_counts_real_tokens_exactly(mixlora_model, tokenizer, arc):
    """Counts equal the sum of per-example routings (no padding), and shares are well formed."""
    res = evaluate_task(mixlora_model, tokenizer, arc, _opts(batch_size=5, padding_side="right"))
    load = res.expert_load
    k = mixlora_model.mixlora_config.top_k
    counts = torch.zeros(2, 4, dtype=torch.float64)
    tokens = 0
    with torch.inference_mode():
        for ex in arc.examples:
            ids = encode_prompt(tokenizer, ex.prompt)
            mixlora_model(input_ids=torch.tensor([ids]))
            stats = routing_statistics(mixlora_model)
            counts += stats.counts_LE.double()
            tokens += len(ids)
    assert load["tokens"] == tokens
    assert load["counts"] == counts.long().tolist()
    share = torch.tensor(load["share"])
    torch.testing.assert_close(share.sum(-1), torch.ones(2, dtype=share.dtype))
    torch.testing.assert_close(torch.tensor(load["token_fraction"]).sum(-1), torch.full((2,), float(k), dtype=share.dtype))
    torch.testing.assert_close(torch.tensor(load["share_std"]), share.std(-1, unbiased=False))
    assert load["share_std_mean"] == pytest.approx(float(share.std(-1, unbiased=False).mean()))


def test_base_model_has_no_expert_profile(tokenizer, base_dir, arc):
    from mixlora_ds.inference import load_for_inference

    model, _ = load_for_inference(base_dir, dtype="float32", device="cpu")
    res = evaluate_task(model, tokenizer, arc, _opts())
    assert res.expert_load is None and res.n == len(arc)


def test_loglik_scoring_picks_the_most_likely_text(mixlora_model, tokenizer, data_dir):
    task = load_task("piqa", find_task_file(data_dir, "piqa", "eval"))
    res = evaluate_task(mixlora_model, tokenizer, task, _opts(scoring="loglik", batch_size=3))
    with torch.inference_mode():
        for ex, pred in zip(task.examples, res.predictions):
            scores = []
            for text in ex.choice_texts:
                ctx = encode_prompt(tokenizer, ex.prompt)
                whole = encode_prompt(tokenizer, ex.prompt + " " + text)
                logp = torch.log_softmax(mixlora_model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
                scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
            assert pred == ex.choice_labels[max(range(len(scores)), key=scores.__getitem__)]
    assert res.accuracy_norm is not None and 0 <= res.accuracy_norm <= 1


def test_boolq_passage_and_truncation_variants(mixlora_model, tokenizer, data_dir, tmp_path):
    path = find_task_file(data_dir, "boolq", "eval")
    plain = load_task("boolq", path)
    with_passage = load_task("boolq", path, boolq_passage=True)
    for a, b in zip(plain.examples, with_passage.examples):
        assert b.prompt.endswith(a.prompt) and b.prompt.startswith("Passage: ")
    no_passage = write_jsonl(tmp_path / "b.jsonl", [{"question": "is it", "answer": True}])
    with pytest.raises(TaskError, match=r"b\.jsonl:1: field 'passage'"):
        load_task("boolq", no_passage, boolq_passage=True)
    # A prompt cut on the right loses "Answer:"; cut on the left it keeps it. Both are counted.
    right = evaluate_task(mixlora_model, tokenizer, with_passage, _opts(max_length=12, truncation="right"))
    left = evaluate_task(mixlora_model, tokenizer, with_passage, _opts(max_length=12, truncation="left"))
    assert right.truncated == left.truncated == len(with_passage)


def test_custom_multiple_choice_task(mixlora_model, tokenizer, tmp_path):
    from mixlora_ds.eval import custom_task

    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "what is warm?", "choices": ["ice", "sun", "snow"], "answer": 1},
        {"question": "what flies?", "choices": ["bird", "stone"], "answer": "A", "context": "Think."},
        {"question": "q", "choices": ["x", "y"], "labels": ["1", "2"], "answer": "2", "prompt": "Pick:\nAnswer:"},
    ])
    task = custom_task("mine", path)
    assert [e.gold_label for e in task.examples] == ["B", "A", "2"]
    assert task.examples[0].labels == ("A", "B", "C")
    assert task.examples[1].prompt.startswith("Think.\nPlease choose")
    assert task.examples[2].prompt == "Pick:\nAnswer:"
    res = evaluate_task(mixlora_model, tokenizer, task, _opts())
    assert res.n == 3 and res.predictions[1] in ("A", "B") and res.predictions[2] in ("1", "2")


@pytest.mark.parametrize(
    "content, match",
    [
        ("", r"no records"),
        ("\n\n", r"no records"),
        ('{"question": "q"\n', r"mc\.jsonl:1: invalid JSON"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 0}\n[1]\n', r"mc\.jsonl:2: expected a JSON object"),
        ('{"question": "q", "choices": ["a"], "answer": 0}\n', r"mc\.jsonl:1: field 'choices'"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 5}\n', r"mc\.jsonl:1: field 'answer': index 5"),
        ('{"question": "q", "choices": ["a", "b"]}\n', r"mc\.jsonl:1: field 'answer': missing"),
    ],
)
def test_bad_custom_task_files(tmp_path, content, match):
    path = tmp_path / "mc.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskError, match=match):
        load_task("mine", path, custom=True)


def test_bad_builtin_task_input(tmp_path, data_dir):
    with pytest.raises(TaskError, match="unknown task 'arc-x'"):
        load_task("arc-x", tmp_path / "x.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TaskError, match=r"empty\.jsonl: task file has no records"):
        load_task("arc-e", empty)
    with pytest.raises(TaskError, match="task file not found"):
        load_task("arc-e", tmp_path / "missing.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", task_records("obqa", 2) + [{"question_stem": "q", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "F"}])
    with pytest.raises(TaskError, match=r"bad\.jsonl:3: field 'answerKey'"):
        load_task("obqa", bad)
    with pytest.raises(TaskError, match="no 'eval' file for task 'piqa'"):
        find_task_file(tmp_path, "piqa", "eval")


def test_results_document_and_table(mixlora_model, tokenizer, arc, tmp_path):
    from mixlora_ds.eval import markdown_table, results_document, write_json

    res = evaluate_task(mixlora_model, tokenizer, arc, _opts())
    doc = results_document([res], {"method": "MixLoRA"})
    write_json(tmp_path / "r.json", doc)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["tasks"]["arc-c"]["correct"] == res.correct and back["tasks"]["arc-c"]["n"] == 12
    assert "predictions" not in back["tasks"]["arc-c"]
    table = markdown_table({"LoRA": {"boolq": 0.5, "arc-e": 0.25, "mine": 1.0}, "MixLoRA": {"arc-e": 0.75}})
    lines = table.strip().splitlines()
    assert lines[0] == "| Method | ARC-e | BoolQ | mine | AVG |"
    assert lines[2] == "| LoRA | 25.0 | 50.0 | 100.0 | 58.3 |"
    assert lines[3] == "| MixLoRA | 75.0 | - | - | 75.0 |"


def test_padding_rows_do_not_leak_into_real_rows(mixlora_model, tokenizer):
    """Rows padded on the left with many pad tokens give the logits of the unpadded sequence."""
    short = encode_prompt(tokenizer, "is it\nAnswer:")
    long = encode_prompt(tokenizer, " ".join(["stone"] * 40) + "\nAnswer:")
    with torch.inference_mode():
        alone = mixlora_model(input_ids=torch.tensor([short])).logits[0, -1]
        batch = pad_batch([short, long], tokenizer.pad_token_id, "left")
        out = mixlora_model(input_ids=batch.input_ids_BS, attention_mask=batch.attention_mask_BS,
                            position_ids=batch.position_ids_BS).logits[0, -1]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, alone, atol=2e-5, rtol=1e-5)
