"""Evaluation tasks: read task files and turn records into scoring examples.

A built-in task (arc-e, arc-c, boolq, obqa, piqa, siqa, hellaswag, winogrande) takes its prompt text and
label sets from ``mixlora_ds.data.templates.TASKS`` so evaluation sees exactly the prompts training saw.
A custom multiple-choice task is a JSONL file with one record per line:

    {"question": "...", "choices": ["...", "..."], "answer": 1}          # answer: index or label
    optional: "labels": ["A", "B"] (default A, B, C, ...), "context": "..." (a line before the question),
              "prompt": "..." (full prompt text, replaces the built one)

Reference quirks, reproduced by default (``reference-mixlora.md`` §7.3, §9 item 14), each with a
corrected variant:
- ARC is scored over all nine labels 1-4, A-E even when a question has four choices
  (``per_record_labels=True`` scores each record over its own labels);
- BoolQ's prompt has no passage (``boolq_passage=True`` puts it in front of the reference prompt).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mixlora_ds.data.templates import TASKS

BUILTIN_TASKS: tuple[str, ...] = tuple(TASKS)


class TaskError(ValueError):
    """A task name, task file or record that cannot be evaluated; the message names the file/line/field."""


@dataclass(frozen=True)
class EvalExample:
    """One record, ready to score.

    ``labels`` are the candidates of label-logit scoring (the task's whole label set by default);
    ``choice_texts`` the candidates of log-likelihood scoring, aligned with ``choice_labels``.
    """

    index: int
    prompt: str
    gold_label: str
    labels: tuple[str, ...]
    choice_labels: tuple[str, ...]
    choice_texts: tuple[str, ...]

    @property
    def gold_choice(self) -> int:
        return self.choice_labels.index(self.gold_label)


@dataclass(frozen=True)
class EvalTask:
    name: str
    source: str
    examples: tuple[EvalExample, ...]

    def __len__(self) -> int:
        return len(self.examples)


# ---------------------------------------------------------------------------------------- reading
def read_records(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``(location, record)`` pairs of a ``.jsonl`` file (one object a line, blank lines skipped) or a
    ``.json`` list; the location (``file:line``) is what error messages name."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    text = path.read_text(encoding="utf-8")
    records: list[tuple[str, dict[str, Any]]] = []
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise TaskError(f"{path}: item {i}: expected a JSON object, got {type(rec).__name__}")
            records.append((f"{path} item {i}", rec))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((f"{path}:{lineno}", rec))
    if not records:
        raise TaskError(f"{path}: task file has no records")
    return records


# -------------------------------------------------------------------------------- built-in tasks
def boolq_passage_prompt(spec: Any, record: dict[str, Any], where: str) -> str:
    """The corrected BoolQ prompt: the passage, then the reference prompt unchanged.

    Keeping the reference text after the passage means an adapter trained on reference prompts still
    sees the instruction it learned; the passage is the only addition.
    """
    passage = record.get("passage")
    if not isinstance(passage, str) or not passage.strip():
        raise TaskError(f"{where}: field 'passage' is missing or empty (needed by the BoolQ passage variant)")
    return f"Passage: {passage.strip()}\n{spec.build_prompt(record)}"


def builtin_task(
    name: str,
    path: str | os.PathLike,
    *,
    per_record_labels: bool = False,
    boolq_passage: bool = False,
    limit: int | None = None,
) -> EvalTask:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {sorted(TASKS)} (or a custom JSONL)")
    spec = TASKS[name]
    records = read_records(path)[:limit]
    examples = []
    for i, (where, rec) in enumerate(records):
        try:
            spec.validate(rec, where)
        except ValueError as e:  # DataError subclasses ValueError
            raise TaskError(str(e)) from None
        prompt = boolq_passage_prompt(spec, rec, where) if (boolq_passage and name == "boolq") else spec.build_prompt(rec)
        choice_labels = tuple(spec.choice_labels(rec))
        gold = spec.answer_label(rec)
        if gold not in choice_labels:
            raise TaskError(f"{where}: answer {gold!r} is not one of the record's labels {list(choice_labels)}")
        examples.append(
            EvalExample(
                index=i,
                prompt=prompt,
                gold_label=gold,
                labels=choice_labels if per_record_labels else tuple(spec.labels),
                choice_labels=choice_labels,
                choice_texts=tuple(spec.choice_texts(rec)),
            )
        )
    return EvalTask(name=name, source=str(path), examples=tuple(examples))


# ----------------------------------------------------------------------------------- custom tasks
def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def custom_example(rec: dict[str, Any], index: int, where: str) -> EvalExample:
    def bad(field: str, message: str) -> TaskError:
        return TaskError(f"{where}: field '{field}': {message}")

    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad("question", "missing or not a non-empty string")
    choices = rec.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise bad("choices", "must be a list of at least two strings")
    labels = rec.get("labels", _letters(len(choices)))
    if not isinstance(labels, list) or len(labels) != len(choices) or not all(isinstance(x, str) and x for x in labels):
        raise bad("labels", f"must be a list of {len(choices)} non-empty strings (one per choice)")
    if len(set(labels)) != len(labels):
        raise bad("labels", f"labels repeat: {labels}")
    if "answer" not in rec:
        raise bad("answer", "missing")
    answer = rec["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise bad("answer", "must be a choice index or one of the labels")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise bad("answer", f"index {answer} out of range for {len(choices)} choices")
        gold = labels[answer]
    else:
        if answer not in labels:
            raise bad("answer", f"{answer!r} is not one of {labels}")
        gold = answer
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise bad("prompt", "must be a non-empty string")
        prompt = rec["prompt"]
    else:
        # The ARC/OBQA layout of the reference templates, so a model tuned on them reads it naturally.
        options = "".join(f" ({lab}) {txt}" for lab, txt in zip(labels, choices))
        context = rec.get("context")
        if context is not None and not isinstance(context, str):
            raise bad("context", "must be a string")
        head = f"{context.strip()}\n" if context else ""
        prompt = f"{head}Please choose the correct answer to the question: {question}{options}\nAnswer:"
    return EvalExample(
        index=index,
        prompt=prompt,
        gold_label=gold,
        labels=tuple(labels),
        choice_labels=tuple(labels),
        choice_texts=tuple(choices),
    )


def custom_task(name: str, path: str | os.PathLike, *, limit: int | None = None) -> EvalTask:
    """A multiple-choice JSONL task. Always scored over each record's own labels: there is no
    reference convention to reproduce, and a shared label set would mix questions with different
    numbers of choices."""
    records = read_records(path)[:limit]
    examples = tuple(custom_example(rec, i, where) for i, (where, rec) in enumerate(records))
    return EvalTask(name=name, source=str(path), examples=examples)


# ------------------------------------------------------------------------------- file resolution
_SPLIT_ALIASES = {
    "eval": ("eval", "test", "validation", "dev"),
    "test": ("test", "eval"),
    "validation": ("validation", "eval", "dev"),
    "train": ("train",),
}


def find_task_file(data_dir: str | os.PathLike, task: str, split: str) -> Path:
    """Locate ``task``'s ``split`` file under ``data_dir``; several common layouts are accepted."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TaskError(f"{data_dir}: data directory not found")
    tried: list[Path] = []
    for s in _SPLIT_ALIASES.get(split, (split,)):
        for ext in (".jsonl", ".json"):
            for candidate in (
                data_dir / task / f"{s}{ext}",
                data_dir / f"{task}.{s}{ext}",
                data_dir / f"{task}_{s}{ext}",
                data_dir / f"{task}-{s}{ext}",
                data_dir / s / f"{task}{ext}",
            ):
                tried.append(candidate)
                if candidate.is_file():
                    return candidate
    raise TaskError(
        f"no {split!r} file for task {task!r} under {data_dir}; tried e.g. {[str(p) for p in tried[:5]]}"
    )


def load_task(
    name: str,
    path: str | os.PathLike,
    *,
    custom: bool = False,
    per_record_labels: bool = False,
    boolq_passage: bool = False,
    limit: int | None = None,
) -> EvalTask:
    """One task from one file: a built-in task by name, or a custom multiple-choice task."""
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be >= 1, got {limit}")
    if custom:
        return custom_task(name, path, limit=limit)
    if name not in BUILTIN_TASKS:
        raise TaskError(
            f"unknown task {name!r}; known tasks: {list(BUILTIN_TASKS)}; "
            "a custom multiple-choice JSONL is given as NAME=PATH with --custom-task"
        )
    return builtin_task(name, path, per_record_labels=per_record_labels, boolq_passage=boolq_passage, limit=limit)


def parse_name_path(spec: str, option: str) -> tuple[str, str]:
    """``NAME=PATH`` from the command line."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise TaskError(f"{option} expects NAME=PATH, got {spec!r}")
    return name, path


__all__: Sequence[str] = [
    "BUILTIN_TASKS",
    "EvalExample",
    "EvalTask",
    "TaskError",
    "builtin_task",
    "custom_task",
    "find_task_file",
    "load_task",
    "parse_name_path",
    "read_records",
]
