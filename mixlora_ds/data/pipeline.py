"""The offline preparation job: sources -> tokens + loss masks -> packed rows -> shards.

    plan (main)        scan every input once: sha256, record count, chunk boundaries
    encode (workers)   parse, validate, template and tokenize one chunk at a time
    pack (main)        first-fit decreasing over bounded windows of the example stream
    write (main)       shards into a temporary directory, manifest last, then one rename

Chunks are submitted in a fixed order (round-robin over sources, so tasks mix within a packing
window) and consumed in that order with a bounded number in flight: output does not depend on
the number of processes, and memory does not grow with the input.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, TextIO

import numpy as np

from mixlora_ds.data import encode as encode_mod
from mixlora_ds.data.encode import (OVERLONG_POLICIES, ChunkResult, Encoder, EncodeSettings,
                                    ExampleBatch, SourceRule)
from mixlora_ds.data.errors import DataError
from mixlora_ds.data.packing import WindowPacker
from mixlora_ds.data.sampling import (STREAM_EVAL, STREAM_WEIGHT, fraction_threshold,
                                      record_hashes, smallest_threshold, stream_key)
from mixlora_ds.data.shards import (FORMAT_VERSION, ShardWriter, atomic_output_dir,
                                    write_manifest)
from mixlora_ds.data.sources import SourcePlan, SourceSpec, iter_plan_chunks, plan_source
from mixlora_ds.data.templates import INSTRUCTION_TEMPLATES, TEMPLATE_VERSION, template_fingerprint
from mixlora_ds.data.tokenizer_io import load_tokenizer, pad_id_of, tokenizer_fingerprint


# Set from a signal handler (SIGTERM of a batch scheduler). The handler also raises
# KeyboardInterrupt at once, but an exception raised inside interpreter callbacks (e.g. at-fork
# hooks) can be swallowed, so the job also checks this flag between chunks and before publishing.
_STOP = threading.Event()


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def _check_stop() -> None:
    if _STOP.is_set():
        raise KeyboardInterrupt


_FORKING = threading.Event()


def forking() -> bool:
    """True while worker processes are being forked: a SIGTERM handler must not raise then, since
    an exception inside a library's at-fork hooks (filelock has some) can be swallowed or leave
    them half-done (both seen in CI). ``_run_chunks`` checks for a stop right after."""
    return _FORKING.is_set()


@dataclass
class PrepareConfig:
    """Settings of one prepare run (CLI flags and mixture-file keys map onto these)."""

    sources: list[SourceSpec]
    tokenizer: str
    seq_len: int
    out: str
    num_proc: int = 1
    seed: int = 42
    skip_invalid: bool = False
    append_eos: bool = True
    train_on_prompt: bool = False
    overlong: str = "truncate"
    instruction_template: str = "alpaca"
    rows_per_shard: int = 2048
    pack_window_tokens: int = 1 << 22
    chunk_bytes: int = 1 << 20
    chunk_records: int = 2048
    overwrite: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def validate(self) -> None:
        def bad(name: str, msg: str) -> DataError:
            return DataError(f"setting '{name}': {msg}", reason="bad_value", field=name)

        if not self.sources:
            raise bad("input", "no inputs given (--input or a mixture file)")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise bad("seq_len", f"must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise bad("num_proc", f"must be an integer >= 1, got {self.num_proc!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise bad("overlong", f"must be one of {list(OVERLONG_POLICIES)}, got "
                                  f"{self.overlong!r}")
        if self.instruction_template not in INSTRUCTION_TEMPLATES:
            raise bad("instruction_template", f"must be one of {sorted(INSTRUCTION_TEMPLATES)}")
        for name in ("rows_per_shard", "pack_window_tokens", "chunk_bytes", "chunk_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad(name, f"must be a positive integer, got {value!r}")
        for name in ("append_eos", "train_on_prompt", "skip_invalid", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        for name in ("tokenizer", "out"):
            if not isinstance(getattr(self, name), (str, os.PathLike)) or not getattr(self, name):
                raise bad(name, f"must be a path, got {getattr(self, name)!r}")


@dataclass
class _TaskStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class _SourceStats:
    records: int = 0
    examples: Counter = field(default_factory=Counter)   # split -> count
    skipped: Counter = field(default_factory=Counter)    # reason -> count


# --------------------------------------------------------------------------- planning
def _make_rules(plans: list[SourcePlan], tasks: list[str], seed: int) -> list[SourceRule]:
    rules = []
    for plan in plans:
        s, n = plan.spec, plan.num_records
        key = f"{plan.sha256}\0{s.task}"
        rule: dict[str, Any] = dict(label=s.label, kind=s.kind, task_id=tasks.index(s.task),
                                    split=s.split)
        held_out = np.zeros(n, dtype=bool)
        if s.split == "train" and (s.eval_count or s.eval_fraction):
            count = s.eval_count if s.eval_count else max(1, round(s.eval_fraction * n))
            if count >= n:
                raise DataError(f"{s.origin}: holding out {count} eval records would leave no "
                                f"training records in {s.label} ({n} records)",
                                reason="bad_value", field="eval_count")
            rule["eval_key"] = stream_key(seed, key, STREAM_EVAL)
            hashes = record_hashes(rule["eval_key"], np.arange(n, dtype=np.uint64))
            rule["eval_threshold"] = smallest_threshold(hashes, count)
            held_out = hashes < np.uint64(rule["eval_threshold"])
        if s.split == "train" and s.num_samples is not None:
            n_train = n - int(held_out.sum())
            rule["weight_key"] = stream_key(seed, key, STREAM_WEIGHT)
            rule["base_copies"], extra = divmod(s.num_samples, n_train)
            if extra:
                hashes = record_hashes(rule["weight_key"], np.arange(n, dtype=np.uint64))
                hashes[held_out] = np.iinfo(np.uint64).max  # choose among training records only
                rule["extra_threshold"] = smallest_threshold(hashes, extra)
        elif s.split == "train" and s.weight is not None:
            rule["weight_key"] = stream_key(seed, key, STREAM_WEIGHT)
            rule["base_copies"] = int(s.weight)
            rule["extra_threshold"] = fraction_threshold(s.weight - int(s.weight))
        rules.append(SourceRule(**rule))
    return rules


def _round_robin(plans: list[SourcePlan]) -> Iterator:
    """Chunks alternating between sources, so every packing window mixes the tasks."""
    iters = deque(iter_plan_chunks(p) for p in plans)
    while iters:
        it = iters.popleft()
        chunk = next(it, None)
        if chunk is not None:
            yield chunk
            iters.append(it)


def _run_chunks(chunks: Iterable, config: PrepareConfig, settings: EncodeSettings,
                rules: list[SourceRule], tokenizer: Any) -> Iterator[ChunkResult]:
    """Encode chunks in order, in this process or in a pool with a bounded number in flight."""
    if config.num_proc == 1:
        encoder = Encoder(settings, rules, tokenizer)
        for chunk in chunks:
            yield encoder.encode_chunk(chunk)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    encode_mod.set_inherited(settings, rules, tokenizer)
    max_in_flight = 2 * config.num_proc + 2
    # Objects that exist now are never collected in the workers: without this, the collector's
    # bookkeeping writes would copy most of the parent's (torch-sized) heap into every child.
    gc.freeze()
    try:
        _FORKING.set()
        try:
            pool = ctx.Pool(config.num_proc, initializer=encode_mod.init_worker, initargs=(settings, rules))
        finally:
            _FORKING.clear()
        with pool:
            _check_stop()  # a SIGTERM while forking only requested the stop
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(encode_mod.encode_in_worker, (chunk,)))
                if len(pending) >= max_in_flight:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        encode_mod.set_inherited(None)
        gc.unfreeze()


# --------------------------------------------------------------------------- the job
def prepare(config: PrepareConfig, log: TextIO | None = None) -> dict[str, Any]:
    """Run the preparation job; returns the manifest written to ``config.out``.

    Raises DataError for bad input; ``config.out`` is then untouched. The summary table goes
    to ``log`` (default stdout), the progress bar to stderr."""
    log = log if log is not None else sys.stdout
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    config.validate()
    tok = load_tokenizer(config.tokenizer)
    fingerprint = tokenizer_fingerprint(tok, config.tokenizer)
    token_dtype = "uint16" if len(tok) <= np.iinfo(np.uint16).max + 1 else "int32"
    pad_id = pad_id_of(tok)
    tasks: list[str] = []
    for s in config.sources:
        if s.task not in tasks:
            tasks.append(s.task)
    settings = EncodeSettings(
        tokenizer_dir=str(config.tokenizer), seq_len=config.seq_len, append_eos=config.append_eos,
        train_on_prompt=config.train_on_prompt, overlong=config.overlong,
        instruction_template=config.instruction_template, skip_invalid=config.skip_invalid,
        token_dtype=token_dtype)
    Encoder(settings, [], tok)  # fail fast on tokenizer problems, before scanning inputs
    plans = [plan_source(s, i, config.chunk_bytes, config.chunk_records)
             for i, s in enumerate(config.sources)]
    rules = _make_rules(plans, tasks, config.seed)

    task_stats = {split: [_TaskStats() for _ in tasks] for split in ("train", "eval")}
    source_stats = [_SourceStats() for _ in plans]
    total_records = sum(p.num_records for p in plans)

    with atomic_output_dir(config.out, config.overwrite) as tmp:
        writers = {split: ShardWriter(tmp / split, config.rows_per_shard)
                   for split in ("train", "eval")}
        packers = {split: WindowPacker(config.seq_len, pad_id, config.pack_window_tokens,
                                       writers[split].add) for split in ("train", "eval")}
        from tqdm.auto import tqdm

        bar = tqdm(total=total_records, unit="rec", unit_scale=True, desc="prepare",
                   disable=None if config.progress is None else not config.progress,
                   file=sys.stderr)
        try:
            for result in _run_chunks(_round_robin(plans), config, settings, rules, tok):
                _account(result, task_stats, source_stats)
                for split, batch in result.batches.items():
                    packers[split].add(batch)
                bar.update(result.records)
                _check_stop()
        finally:
            bar.close()
        for split in ("train", "eval"):
            packers[split].flush()
        shards = {split: writers[split].close() for split in ("train", "eval")}
        if not shards["train"]:
            raise DataError(_no_examples_message(config, task_stats["train"]), reason="no_examples")
        manifest = _manifest(config, fingerprint, token_dtype, pad_id, tasks, plans, shards,
                             task_stats, source_stats)
        write_manifest(tmp, manifest)
        _check_stop()  # last chance before the output is published
    _print_summary(manifest, time.perf_counter() - t_start, _cpu_seconds() - cpu_start, log)
    return manifest


def _no_examples_message(config: PrepareConfig, train_stats: list[_TaskStats]) -> str:
    dropped = sum(st.dropped for st in train_stats)
    if dropped:
        why = ("longer than" if config.overlong == "drop" else
               "with no response token left after truncation to")
        return (f"no training examples: all {dropped} training examples were dropped as {why} "
                f"--seq-len {config.seq_len} (overlong: {config.overlong}); raise --seq-len")
    return "no training examples: every input was empty, held out or skipped"


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _account(result: ChunkResult, task_stats: dict[str, list[_TaskStats]],
             source_stats: list[_SourceStats]) -> None:
    src = source_stats[result.source]
    src.records += result.records
    src.skipped.update(result.skipped)
    for split, batch in result.batches.items():
        _add_batch_stats(task_stats[split], batch)
        src.examples[split] += batch.num_examples
    for (split, task), n in result.truncated.items():
        task_stats[split][task].truncated += n
    for (split, task), n in result.dropped.items():
        task_stats[split][task].dropped += n


def _add_batch_stats(stats: list[_TaskStats], batch: ExampleBatch) -> None:
    if batch.num_examples == 0:  # every example of the chunk was dropped (too long, say)
        return
    task = int(batch.task_ids[0])  # one chunk is one source is one task
    st = stats[task]
    st.examples += batch.num_examples
    st.tokens += int(batch.lengths.sum())
    st.trained_tokens += int(np.count_nonzero(batch.loss_mask))


def _manifest(config: PrepareConfig, fingerprint: dict[str, Any], token_dtype: str, pad_id: int,
              tasks: list[str], plans: list[SourcePlan], shards: dict[str, list],
              task_stats: dict[str, list[_TaskStats]],
              source_stats: list[_SourceStats]) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split, shard_list in shards.items():
        if not shard_list:
            continue
        rows = sum(s["rows"] for s in shard_list)
        per_task = {tasks[i]: asdict(st) for i, st in enumerate(task_stats[split])
                    if st.examples or st.truncated or st.dropped}
        tokens = sum(st.tokens for st in task_stats[split])
        slots = rows * config.seq_len
        splits[split] = {
            "shards": shard_list,
            "rows": rows,
            "examples": sum(s["examples"] for s in shard_list),
            "max_token_id": max(s["max_token_id"] for s in shard_list),
            "tokens": tokens,
            "trained_tokens": sum(st.trained_tokens for st in task_stats[split]),
            "slots": slots,
            "packing_efficiency": round(tokens / slots, 6),
            "truncated": sum(st.truncated for st in task_stats[split]),
            "dropped": sum(st.dropped for st in task_stats[split]),
            "tasks": per_task,
        }
    inputs = []
    skipped_by_file: dict[str, dict[str, int]] = {}
    for plan, st in zip(plans, source_stats):
        entry = plan.manifest_entry()
        entry["records_read"] = st.records
        entry["examples"] = dict(sorted(st.examples.items()))
        entry["skipped"] = dict(sorted(st.skipped.items()))
        inputs.append(entry)
        if st.skipped:
            skipped_by_file.setdefault(plan.spec.label, Counter()).update(st.skipped)
    return {
        "format_version": FORMAT_VERSION,
        "template_version": TEMPLATE_VERSION,
        "template_fingerprint": template_fingerprint(),
        "seq_len": config.seq_len,
        "token_dtype": token_dtype,
        "pad_id": pad_id,
        "seed": config.seed,
        "append_eos": config.append_eos,
        "train_on_prompt": config.train_on_prompt,
        "overlong": config.overlong,
        "instruction_template": config.instruction_template,
        "pack_window_tokens": config.pack_window_tokens,
        "rows_per_shard": config.rows_per_shard,
        "chunk_bytes": config.chunk_bytes,
        "chunk_records": config.chunk_records,
        "skip_invalid": config.skip_invalid,
        "tokenizer": fingerprint,
        "tasks": tasks,
        "inputs": inputs,
        "splits": splits,
        "skipped": {"total": sum(sum(c.values()) for c in skipped_by_file.values()),
                    "by_file": {k: dict(sorted(v.items())) for k, v in skipped_by_file.items()}},
    }


def _print_summary(manifest: dict[str, Any], seconds: float, cpu_seconds: float,
                   log: TextIO) -> None:
    header = f"{'split':<6} {'task':<14} {'examples':>9} {'tokens':>11} {'trained':>10} " \
             f"{'truncated':>9} {'dropped':>8}"
    lines = [header, "-" * len(header)]
    total_tokens = 0
    for split, info in manifest["splits"].items():
        for task, st in info["tasks"].items():
            lines.append(f"{split:<6} {task:<14} {st['examples']:>9} {st['tokens']:>11} "
                         f"{st['trained_tokens']:>10} {st['truncated']:>9} {st['dropped']:>8}")
        lines.append(f"{split:<6} {'(all)':<14} {info['examples']:>9} {info['tokens']:>11} "
                     f"{info['trained_tokens']:>10} {info['truncated']:>9} {info['dropped']:>8}"
                     f"   {info['rows']} rows x {manifest['seq_len']}, packing efficiency "
                     f"{100 * info['packing_efficiency']:.1f}%")
        total_tokens += info["tokens"]
    skipped = manifest["skipped"]
    if skipped["total"]:
        lines.append(f"skipped {skipped['total']} invalid records:")
        for label, reasons in skipped["by_file"].items():
            for reason, n in reasons.items():
                lines.append(f"  {label}: {reason}: {n}")
    lines.append(f"{total_tokens} tokens in {seconds:.2f} s "
                 f"({total_tokens / max(seconds, 1e-9):,.0f} tokens/s, {cpu_seconds:.2f} CPU s)")
    print("\n".join(lines), file=log)
