"""The generated sample set: complete, valid in the public schemas, deterministic, held-out eval
records distinct from training ones, and answers that follow from the sample world's facts."""

from __future__ import annotations

import re
from collections import Counter

from mixlora_ds.data import sample_data as sd
from mixlora_ds.data.templates import TASKS, format_instruction

from tests.data.conftest import read_records, tree_bytes


def test_all_tasks_both_splits_valid(sample):
    paths = sample["paths"]
    assert set(paths) == set(TASKS) | {"alpaca"}
    for task, spec in TASKS.items():
        for split, size in (("train", 240), ("eval", 60)):
            records = read_records(paths[task][split])
            assert len(records) == size
            for i, rec in enumerate(records):
                spec.validate(rec, f"{paths[task][split]}:{i + 1}")
        train_prompts = {spec.build_prompt(r) for r in read_records(paths[task]["train"])}
        eval_prompts = {spec.build_prompt(r) for r in read_records(paths[task]["eval"])}
        assert not train_prompts & eval_prompts, f"{task}: eval prompt seen in training"
        gold = Counter(spec.answer_label(r) for r in read_records(paths[task]["train"]))
        # No answer position dominates: a model has to read the question.
        assert max(gold.values()) < 0.7 * 240, (task, gold)
    alpaca = read_records(paths["alpaca"]["train"])
    assert len(alpaca) == 200
    for rec in alpaca:
        format_instruction(rec)
    assert (sample["dir"] / "mixture.yaml").is_file()


def test_deterministic(sample, tmp_path):
    sd.write_sample_data(tmp_path)
    assert tree_bytes(tmp_path) == tree_bytes(sample["dir"])


def _category(word: str) -> str | None:
    return next((c for c, members in sd.CATEGORIES.items() if word in members), None)


def test_answers_follow_from_the_facts(sample):
    """The gold answer is the one choice the sample world's facts single out."""
    paths = sample["paths"]
    for rec in read_records(paths["arc-e"]["train"]):
        cat = next(c for c in sd.CATEGORIES if c in rec["question"])
        members = [t for t in rec["choices"]["text"] if _category(t) == cat]
        assert len(members) == 1
        gold = rec["choices"]["label"].index(rec["answerKey"])
        assert rec["choices"]["text"][gold] == members[0]
    for rec in read_records(paths["boolq"]["train"]):
        q = rec["question"]
        kind = re.fullmatch(r"(?:is|can) a (\w+) (?:a kind of|a type of|be called a) (\w+)", q)
        if kind:
            assert rec["answer"] == (_category(kind[1]) == kind[2])
        else:
            temp = re.fullmatch(r"(?:is|does|would) (.+?) (?:feel |be )?(hot|cold)(?: to touch)?",
                                q)
            assert temp, q
            assert rec["answer"] == ((temp[1] in sd.HOT) == (temp[2] == "hot"))
    for rec in read_records(paths["winogrande"]["train"]):
        pick = rec["option1"] if rec["answer"] == "1" else rec["option2"]
        other = rec["option2"] if rec["answer"] == "1" else rec["option1"]
        bigger = sd.SIZES.index(pick) > sd.SIZES.index(other)
        assert bigger == ("too big" in rec["sentence"])
    for rec in read_records(paths["siqa"]["train"]):
        event = rec["context"].split(" ", 1)[1].rstrip(".")
        feeling = dict(sd.EVENTS)[event]
        assert rec["answer" + "ABC"[int(rec["label"]) - 1]] == feeling
