"""Records -> token ids and loss masks, one chunk at a time (runs in worker processes).

The training text of an example is exactly what the reference trains on (for the commonsense
tasks ``prompt + " " + label``), tokenized in one piece with the tokenizer's special tokens (BOS
for LLaMA), plus EOS when enabled. Which tokens are trained is found from character offsets: a
token is trained when it covers a character of the response (every assistant turn of a chat),
so tokenization is never split at the prompt/response boundary and stays identical to the
reference's. The first token of every example is never trained: in a packed row it would be
predicted from the previous example.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.sampling import below, record_hashes
from mixlora_ds.data.sources import Chunk, iter_chunk_records
from mixlora_ds.data.templates import TASKS, instruction_segments
from mixlora_ds.data.tokenizer_io import load_tokenizer

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer_dir: str
    seq_len: int
    append_eos: bool = True
    train_on_prompt: bool = False
    overlong: str = "truncate"
    instruction_template: str = "alpaca"
    skip_invalid: bool = False
    token_dtype: str = "int32"


@dataclass(frozen=True)
class SourceRule:
    """What a worker needs to know about one source to turn its records into examples."""

    label: str
    kind: str
    task_id: int
    split: str
    eval_key: int = 0
    eval_threshold: int = 0      # held out when hash < threshold; 0 = nothing held out
    weight_key: int = 0
    base_copies: int = 1
    extra_threshold: int = 0     # one more copy when hash < threshold


@dataclass
class ExampleBatch:
    """Examples in stream order: flat tokens/mask, one entry per example in the rest."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    task_ids: np.ndarray
    source_ids: np.ndarray
    ordinals: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.lengths.shape[0])


@dataclass
class ChunkResult:
    source: int
    batches: dict[str, ExampleBatch]
    records: int = 0
    skipped: Counter = field(default_factory=Counter)     # reason -> count
    truncated: Counter = field(default_factory=Counter)   # (split, task id) -> count
    dropped: Counter = field(default_factory=Counter)     # (split, task id) -> count


class _SplitBuffer:
    """Examples of one split gathered before tokenization."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.spans: list[tuple[tuple[int, int], ...]] = []
        self.ordinals: list[int] = []
        self.copies: list[int] = []


class Encoder:
    def __init__(self, settings: EncodeSettings, rules: list[SourceRule], tokenizer: Any = None):
        self.settings = settings
        self.rules = rules
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(settings.tokenizer_dir)
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or not getattr(self.tok, "is_fast", False):
            raise DataError(f"{settings.tokenizer_dir}: tokenizer is not a fast (tokenizers) "
                            f"tokenizer; preparing data needs its character offsets",
                            reason="bad_tokenizer", field="tokenizer")
        self.backend = backend
        self.eos_id = self.tok.eos_token_id
        if settings.append_eos and self.eos_id is None:
            raise DataError(f"{settings.tokenizer_dir}: tokenizer has no EOS token; prepare "
                            f"without EOS (--no-eos) or use a tokenizer with one",
                            reason="bad_tokenizer", field="eos_token")
        self.dtype = np.dtype(settings.token_dtype)

    # ------------------------------------------------------------------ records -> text
    def render(self, rule: SourceRule, record: Any, where: str) -> tuple[str, tuple]:
        """Training text and its trained character spans."""
        spec = TASKS.get(rule.kind)
        if spec is not None:
            spec.validate(record, where)
            prompt = spec.build_prompt(record)
            text = prompt + spec.completion(record)
            return text, ((len(prompt), len(text)),)
        fmt = None if rule.kind == "instruction" else rule.kind
        segments = instruction_segments(record, where, self.settings.instruction_template, fmt)
        text = "".join(t for t, _ in segments)
        spans, pos = [], 0
        for t, trained in segments:
            if trained and t:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        return text, tuple(spans)

    # ------------------------------------------------------------------ one chunk
    def encode_chunk(self, chunk: Chunk) -> ChunkResult:
        rule = self.rules[chunk.source]
        ords = np.arange(chunk.first_ordinal, chunk.first_ordinal + chunk.count, dtype=np.uint64)
        held_out = (below(record_hashes(rule.eval_key, ords), rule.eval_threshold)
                    if rule.eval_threshold else np.zeros(chunk.count, dtype=bool))
        copies = rule.base_copies + (below(record_hashes(rule.weight_key, ords),
                                           rule.extra_threshold)
                                     if rule.extra_threshold else 0)
        # Plain lists: indexed once per record, where numpy scalars would cost more than the rest.
        held_out = held_out.tolist()
        copies = np.broadcast_to(np.asarray(copies, dtype=np.int64), (chunk.count,)).tolist()
        bufs = {"train": _SplitBuffer(), "eval": _SplitBuffer()}
        result = ChunkResult(source=chunk.source, batches={})
        for ordinal, where, record in iter_chunk_records(chunk, rule.label):
            result.records += 1
            try:
                if isinstance(record, DataError):
                    raise record
                text, spans = self.render(rule, record, where)
            except DataError as e:
                if not self.settings.skip_invalid:
                    raise
                result.skipped[e.reason] += 1
                continue
            i = ordinal - chunk.first_ordinal
            if rule.split == "eval" or held_out[i]:
                split, n = "eval", 1
            else:
                split, n = "train", copies[i]
                if n == 0:
                    continue
            buf = bufs[split]
            buf.texts.append(text)
            buf.spans.append(spans)
            buf.ordinals.append(ordinal)
            buf.copies.append(n)
        for split, buf in bufs.items():
            if buf.texts:
                batch = self._tokenize(rule, chunk.source, split, buf, result)
                if batch.num_examples:  # all may have been dropped as over-long
                    result.batches[split] = batch
        return result

    def _tokenize(self, rule: SourceRule, source: int, split: str, buf: _SplitBuffer,
                  result: ChunkResult) -> ExampleBatch:
        s = self.settings
        seq_len, eos, append_eos = s.seq_len, self.eos_id, s.append_eos
        flat: list[int] = []
        lengths: list[int] = []
        ordinals: list[int] = []
        range_starts: list[int] = []  # trained token ranges, as offsets into `flat`
        range_ends: list[int] = []
        for enc, spans, ordinal, n_copies in zip(self._encodings(buf.texts), buf.spans,
                                                 buf.ordinals, buf.copies):
            ids = enc.ids
            n = len(ids)
            if s.train_on_prompt:
                ranges = [(1, n)]
            else:
                ranges = []
                for c0, c1 in spans:
                    t0 = enc.char_to_token(c0)
                    if t0 is None:
                        t0 = _char_to_token(enc, c0 + 1, c1)
                        if t0 is None:
                            continue
                    t1 = enc.char_to_token(c1 - 1)
                    if t1 is None:
                        t1 = _char_to_token_backward(enc, c1 - 2, c0)
                    ranges.append((max(t0, 1), t1 + 1))
            if append_eos:
                ids = ids + [eos]
                if ranges and ranges[-1][1] == n:
                    ranges[-1] = (ranges[-1][0], n + 1)
                else:
                    ranges.append((n, n + 1))
                n += 1
            if n > seq_len:
                if s.overlong == "drop":
                    result.dropped[(split, rule.task_id)] += n_copies
                    continue
                ids = ids[:seq_len]
                n = seq_len
                ranges = [(a, min(b, n)) for a, b in ranges if a < n]
                if not ranges:  # the response was cut off entirely: nothing left to learn
                    result.dropped[(split, rule.task_id)] += n_copies
                    continue
                result.truncated[(split, rule.task_id)] += n_copies
            for _ in range(n_copies):
                base = len(flat)
                flat.extend(ids)
                for a, b in ranges:
                    if b > a:
                        range_starts.append(base + a)
                        range_ends.append(base + b)
                lengths.append(n)
                ordinals.append(ordinal)
        total = len(flat)
        diff = (np.bincount(np.asarray(range_starts, dtype=np.int64), minlength=total + 1)
                - np.bincount(np.asarray(range_ends, dtype=np.int64), minlength=total + 1))
        mask = (np.cumsum(diff[:total]) > 0).astype(np.uint8)
        count = len(lengths)
        return ExampleBatch(
            tokens=np.asarray(flat, dtype=self.dtype),
            loss_mask=mask,
            lengths=np.asarray(lengths, dtype=np.int32),
            task_ids=np.full(count, rule.task_id, dtype=np.int16),
            source_ids=np.full(count, source, dtype=np.int32),
            ordinals=np.asarray(ordinals, dtype=np.int64),
        )


    def _encodings(self, texts: list[str], batch: int = 256) -> Iterator[Any]:
        # Encodings carry offsets and token strings (~100 bytes a token): a few hundred at a
        # time keeps a worker's memory small whatever the chunk size.
        for i in range(0, len(texts), batch):
            yield from self.backend.encode_batch(texts[i:i + batch], add_special_tokens=True)


def _char_to_token(enc: Any, start: int, stop: int) -> int | None:
    """Index of the first token covering a character in [start, stop) (whitespace a tokenizer
    drops is covered by no token)."""
    for c in range(start, stop):
        t = enc.char_to_token(c)
        if t is not None:
            return t
    return None


def _char_to_token_backward(enc: Any, last: int, first: int) -> int:
    for c in range(last, first - 1, -1):
        t = enc.char_to_token(c)
        if t is not None:
            return t
    raise AssertionError("unreachable: a forward match exists in the same span")


# --------------------------------------------------------------------------- worker process
_WORKER: Encoder | None = None
_INHERITED: tuple[EncodeSettings, list[SourceRule], Any] | None = None


def set_inherited(settings: EncodeSettings | None, rules: list[SourceRule] | None = None,
                  tokenizer: Any = None) -> None:
    """Main process, before forking: workers reuse the loaded tokenizer instead of reloading
    (None clears it once the pool is gone)."""
    global _INHERITED
    _INHERITED = None if settings is None else (settings, rules or [], tokenizer)


def init_worker(settings: EncodeSettings, rules: list[SourceRule]) -> None:
    global _WORKER
    # The parent turns SIGTERM into a clean shutdown; a worker just stops when terminated.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Several worker processes each tokenizing with a thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tok = _INHERITED[2] if _INHERITED is not None and _INHERITED[0] == settings else None
    _WORKER = Encoder(settings, rules, tok)


def encode_in_worker(chunk: Chunk) -> ChunkResult:
    assert _WORKER is not None, "init_worker was not called"
    return _WORKER.encode_chunk(chunk)
