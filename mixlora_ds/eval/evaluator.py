"""Accuracy of a model on evaluation tasks, optionally split over data-parallel ranks.

Each rank scores every ``world_size``-th example (a replica of the whole model per rank); predictions
and expert-load counts are then gathered, so every rank returns the same complete result and rank 0
writes it. The model runs in eval mode (LoRA dropout off) under ``torch.inference_mode``; examples are
batched by length and every score is computed per row, so the numbers do not depend on batch size,
padding side, order or the number of ranks (up to floating-point rounding in near-ties).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch

from mixlora_ds.data.prompt_batch import encode_prompt, pad_batch
from mixlora_ds.data.tokenizer_io import pad_id_of
from mixlora_ds.eval.router_profile import ExpertLoadProfiler
from mixlora_ds.eval.scoring import (
    continuation_logprobs,
    label_context_mismatches,
    label_token_ids,
    last_token_logits,
    pick_labels,
    split_continuation,
    truncate,
)
from mixlora_ds.eval.tasks_io import EvalTask

SCORINGS = ("logits", "label-loglik", "loglik")


@dataclass
class EvalOptions:
    scoring: str = "logits"
    """"logits": the reference's next-token label logits (default). "label-loglik": the
    log-likelihood of " " + label, all of its tokens (corrected: exact when a label is several
    tokens, e.g. " true" or LLaMA's " 1" = "▁", "1"). "loglik": the log-likelihood of " " + answer
    text, lm-eval style (sum; the per-byte normalised choice is reported too)."""
    batch_size: int = 16
    max_length: int = 512
    """Token cap per sequence, as the reference's ``cutoff_len``."""
    truncation: str = "right"
    """"right" drops the end of over-long prompts, possibly "Answer:" (reference); "left" keeps the end.
    Log-likelihood sequences always keep their end (the answer)."""
    padding_side: str = "left"
    """Either gives the same scores; "left" lets the LM head run on the last column only."""
    add_bos: bool = True
    profile_experts: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        if self.truncation not in ("left", "right") or self.padding_side not in ("left", "right"):
            raise ValueError("truncation and padding_side must be 'left' or 'right'")


@dataclass
class TaskResult:
    task: str
    n: int
    correct: int
    accuracy: float
    truncated: int
    """Examples cut to ``max_length``."""
    scoring: str
    predictions: list[str] = field(default_factory=list)
    """Predicted label per example, in file order."""
    correct_norm: int | None = None
    accuracy_norm: float | None = None
    """Log-likelihood scoring only: choice picked by log-likelihood per byte of answer text."""
    expert_load: dict[str, Any] | None = None

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class _Row:
    index: int
    pred: str
    correct: bool
    truncated: bool
    correct_norm: bool | None = None


def _batches(items: Sequence[Any], lengths: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    """Item positions in batches of similar length (longest first: memory trouble shows up at once)."""
    order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, dynamic_ncols=True)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _score_logits(model, tokenizer, task: EvalTask, shard: Sequence[int], opts: EvalOptions,
                  profiler: ExpertLoadProfiler, is_main: bool) -> list[_Row]:
    examples = task.examples
    universe: list[str] = []
    for ex in examples:
        universe.extend(lab for lab in ex.labels if lab not in universe)
    label_ids = label_token_ids(tokenizer, universe)
    label_ids_L = torch.tensor(label_ids, dtype=torch.long)
    bad = label_context_mismatches(tokenizer, universe, label_ids, examples[0].prompt)
    if bad and is_main:
        warnings.warn(
            f"task {task.name!r}: after the prompt, labels {bad} are not single tokens of their own with this "
            "tokenizer, so their next-token logits are not the label's; --scoring label-loglik scores them exactly",
            stacklevel=2,
        )
    column = {lab: i for i, lab in enumerate(universe)}
    pad_id = pad_id_of(tokenizer)
    device = _model_device(model)

    encoded = [encode_prompt(tokenizer, examples[i].prompt, add_bos=opts.add_bos) for i in shard]
    ids = [truncate(e, opts.max_length, opts.truncation) for e in encoded]
    rows: list[_Row] = []
    batches = list(_batches(ids, [len(x) for x in ids], opts.batch_size))
    with _progress(len(batches), task.name, opts.progress and is_main) as bar:
        for batch_pos in batches:
            batch = pad_batch([ids[p] for p in batch_pos], pad_id, opts.padding_side).to(device)
            logits_BV = last_token_logits(model, batch)
            profiler.observe(model, batch.attention_mask_BS)
            allowed_BL = torch.zeros(len(batch_pos), len(universe), dtype=torch.bool)
            for b, p in enumerate(batch_pos):
                allowed_BL[b, [column[lab] for lab in examples[shard[p]].labels]] = True
            picks_B = pick_labels(logits_BV, label_ids_L, allowed_BL).tolist()
            for b, p in enumerate(batch_pos):
                ex = examples[shard[p]]
                pred = universe[picks_B[b]]
                rows.append(_Row(ex.index, pred, pred == ex.gold_label, len(encoded[p]) > opts.max_length))
            bar.update(1)
    return rows


def _candidates(ex, scoring: str) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(labels, continuation texts, gold index) that log-likelihood scoring compares."""
    if scoring == "label-loglik":
        return ex.labels, ex.labels, ex.labels.index(ex.gold_label)
    return ex.choice_labels, ex.choice_texts, ex.gold_choice


def _score_loglik(model, tokenizer, task: EvalTask, shard: Sequence[int], opts: EvalOptions,
                  profiler: ExpertLoadProfiler, is_main: bool) -> list[_Row]:
    examples = task.examples
    pad_id = pad_id_of(tokenizer)
    device = _model_device(model)
    seqs: list[list[int]] = []
    cont_lens: list[int] = []
    owner: list[int] = []  # position in shard of each sequence
    truncated = [False] * len(shard)
    for s, i in enumerate(shard):
        _, texts, _ = _candidates(examples[i], opts.scoring)
        for text in texts:
            ids, n = split_continuation(tokenizer, examples[i].prompt, " " + text, add_bos=opts.add_bos)
            if len(ids) > opts.max_length:
                truncated[s] = True
                ids = truncate(ids, opts.max_length, "left")  # keep the answer, drop the prompt's start
                n = min(n, len(ids) - 1)
            seqs.append(ids)
            cont_lens.append(n)
            owner.append(s)
    scores = torch.empty(len(seqs), dtype=torch.float64)
    batches = list(_batches(seqs, [len(x) for x in seqs], opts.batch_size))
    with _progress(len(batches), task.name, opts.progress and is_main) as bar:
        for batch_pos in batches:
            batch = pad_batch([seqs[p] for p in batch_pos], pad_id, opts.padding_side).to(device)
            lp_B = continuation_logprobs(model, batch, torch.tensor([cont_lens[p] for p in batch_pos]))
            profiler.observe(model, batch.attention_mask_BS)
            scores[batch_pos] = lp_B.double()
            bar.update(1)
    per_example: list[list[float]] = [[] for _ in shard]
    for k, s in enumerate(owner):
        per_example[s].append(float(scores[k]))
    rows = []
    for s, i in enumerate(shard):
        ex = examples[i]
        names, texts, gold = _candidates(ex, opts.scoring)
        lp = torch.tensor(per_example[s], dtype=torch.float64)
        pick = int(lp.argmax())
        row = _Row(ex.index, names[pick], pick == gold, truncated[s])
        if opts.scoring == "loglik":
            nbytes = torch.tensor([max(1, len((" " + t).encode("utf-8"))) for t in texts], dtype=torch.float64)
            row.correct_norm = int((lp / nbytes).argmax()) == gold
        rows.append(row)
    return rows


def _gather_rows(rows: list[_Row]) -> list[_Row]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[_Row] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [asdict(r) for r in rows])
        rows = [_Row(**r) for part in gathered for r in part]  # type: ignore[union-attr]
    return sorted(rows, key=lambda r: r.index)


@torch.inference_mode()
def evaluate_task(model, tokenizer, task: EvalTask, options: EvalOptions | None = None, *,
                  rank: int = 0, world_size: int = 1) -> TaskResult:
    """Score ``task``; with ``world_size > 1`` (an initialised process group) every rank must call it."""
    opts = options or EvalOptions()
    if len(task) == 0:
        raise ValueError(f"task {task.name!r} has no examples")
    was_training = model.training
    model.eval()
    try:
        shard = list(range(rank, len(task), world_size))
        profiler = ExpertLoadProfiler(model if opts.profile_experts else None)
        scorer = _score_logits if opts.scoring == "logits" else _score_loglik
        rows = scorer(model, tokenizer, task, shard, opts, profiler, rank == 0) if shard else []
        rows = _gather_rows(rows)
        profiler.all_reduce_()
    finally:
        model.train(was_training)
    if len(rows) != len(task):
        raise RuntimeError(f"task {task.name!r}: gathered {len(rows)} predictions for {len(task)} examples")
    correct = sum(r.correct for r in rows)
    result = TaskResult(
        task=task.name,
        n=len(rows),
        correct=correct,
        accuracy=correct / len(rows),
        truncated=sum(r.truncated for r in rows),
        scoring=opts.scoring,
        predictions=[r.pred for r in rows],
        expert_load=profiler.summary(),
    )
    if opts.scoring == "loglik":
        result.correct_norm = sum(bool(r.correct_norm) for r in rows)
        result.accuracy_norm = result.correct_norm / len(rows)
    return result


def evaluate_tasks(model, tokenizer, tasks: Sequence[EvalTask], options: EvalOptions | None = None, *,
                   rank: int = 0, world_size: int = 1) -> list[TaskResult]:
    return [evaluate_task(model, tokenizer, t, options, rank=rank, world_size=world_size) for t in tasks]
