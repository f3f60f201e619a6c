"""Evaluation outputs: the JSON result file, the paper-layout markdown table, TensorBoard scalars.

Files are written to a temporary name and renamed, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from mixlora_ds.utils.atomic import atomic_write_text

# Column order and headers of the paper's Table 1.
PAPER_COLUMNS: dict[str, str] = {
    "arc-e": "ARC-e",
    "arc-c": "ARC-c",
    "boolq": "BoolQ",
    "obqa": "OBQA",
    "piqa": "PIQA",
    "siqa": "SIQA",
    "hellaswag": "HellaS",
    "winogrande": "WinoG",
}


def ordered_tasks(tasks: Sequence[str]) -> list[str]:
    """The paper's column order for the built-in tasks, custom tasks after them in the given order."""
    known = [t for t in PAPER_COLUMNS if t in tasks]
    return known + [t for t in tasks if t not in PAPER_COLUMNS]


def markdown_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str] | None = None) -> str:
    """``rows``: method name -> {task: accuracy in [0, 1]}. Tasks are columns, then AVG; values in %.

    AVG is the unweighted mean over the columns, as the paper averages tasks (not examples). A method
    without a task shows "-" there and its AVG covers only the tasks it has.
    """
    if tasks is None:
        seen: list[str] = []
        for accs in rows.values():
            seen.extend(t for t in accs if t not in seen)
        tasks = seen
    cols = ordered_tasks(list(tasks))
    header = "| Method | " + " | ".join(PAPER_COLUMNS.get(t, t) for t in cols) + " | AVG |"
    rule = "|---|" + "---|" * (len(cols) + 1)
    lines = [header, rule]
    for method, accs in rows.items():
        vals = [accs.get(t) for t in cols]
        present = [v for v in vals if v is not None]
        avg = sum(present) / len(present) if present else None
        cells = ["-" if v is None else f"{100 * v:.1f}" for v in vals + [avg]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_document(results: Sequence[Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON result: run metadata, per-task results, and the average accuracy over tasks."""
    tasks = {r.task: r.to_dict() for r in results}
    accs = [r.accuracy for r in results]
    return {
        "meta": dict(meta),
        "tasks": tasks,
        "average_accuracy": sum(accs) / len(accs) if accs else None,
    }


def write_json(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_text(path, text)


def write_tensorboard(log_dir: str | os.PathLike, results: Sequence[Any], *, step: int = 0, prefix: str = "eval") -> None:
    """Accuracy per task and its average; per task and layer the expert load shares and their std."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        accs = []
        for r in results:
            writer.add_scalar(f"{prefix}/{r.task}/accuracy", r.accuracy, step)
            accs.append(r.accuracy)
            load = r.expert_load
            if not load:
                continue
            for layer, (shares, std) in enumerate(zip(load["share"], load["share_std"])):
                for e, v in enumerate(shares):
                    writer.add_scalar(f"{prefix}/{r.task}/expert_load/layer{layer}/expert{e}", v, step)
                writer.add_scalar(f"{prefix}/{r.task}/expert_load/layer{layer}/std", std, step)
            writer.add_scalar(f"{prefix}/{r.task}/expert_load/std_mean_over_layers", load["share_std_mean"], step)
        if accs:
            writer.add_scalar(f"{prefix}/average_accuracy", sum(accs) / len(accs), step)
    finally:
        writer.close()
