"""Data sources: what to read (specs from flags or a mixture file), how to cut it into chunks,
and how to read the records of one chunk.

A source is a local JSON Lines / JSON / parquet file, or a dataset loaded by ``datasets`` name,
holding either one of the commonsense tasks in its public schema or instruction records. Files
are scanned once in the main process (sha256, record count, chunk boundaries at line ends); the
records themselves are parsed in worker processes, chunk by chunk, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.templates import INSTRUCTION_FORMATS, TASKS

# Source kinds besides the commonsense tasks: instruction records, format detected per record
# ("instruction") or fixed.
INSTRUCTION_KINDS = ("instruction",) + INSTRUCTION_FORMATS
SPLITS = ("train", "eval")
_READ_BLOCK = 8 << 20
_ASCII_SPACE = " \t\n\r\x0b\x0c"
_BLANK_FIRST = frozenset(_ASCII_SPACE) | frozenset(_ASCII_SPACE.encode())


@dataclass
class SourceSpec:
    """One input of a prepare run.

    kind:  a commonsense task key (``arc-e``, ...) or an instruction kind (``instruction`` =
           detect per record, ``alpaca``, ``pair``, ``chat``).
    task:  the task name written to the output (task ids); defaults to ``kind``.
    split: ``train`` or ``eval`` (a held-out evaluation file).
    weight / num_samples: multi-task mixing of a train source: every record ``weight`` times in
           expectation (fractional part sampled), or exactly ``num_samples`` records (a seeded
           sample; whole repeats first when larger than the source).
    eval_fraction / eval_count: hold out that many records of a train source as its eval split.
    """

    kind: str
    path: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str | None = None
    task: str | None = None
    split: str = "train"
    weight: float | None = None
    num_samples: int | None = None
    eval_fraction: float | None = None
    eval_count: int | None = None
    origin: str = "--input"

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = self.kind
        where = self.origin
        if self.kind not in TASKS and self.kind not in INSTRUCTION_KINDS:
            raise DataError(f"{where}: unknown task {self.kind!r}; expected one of "
                            f"{sorted(TASKS)} or an instruction kind {list(INSTRUCTION_KINDS)}",
                            reason="unknown_task", field="task")
        if (self.path is None) == (self.dataset is None):
            raise DataError(f"{where}: give exactly one of 'path' and 'dataset'",
                            reason="bad_value", field="path")
        if self.split not in SPLITS:
            raise DataError(f"{where}: field 'split' must be one of {list(SPLITS)}, got "
                            f"{self.split!r}", reason="bad_value", field="split")
        if self.weight is not None and self.num_samples is not None:
            raise DataError(f"{where}: give at most one of 'weight' and 'num_samples'",
                            reason="bad_value", field="weight")
        if self.weight is not None and not (isinstance(self.weight, (int, float))
                                            and not isinstance(self.weight, bool)
                                            and self.weight >= 0):
            raise DataError(f"{where}: field 'weight' must be a number >= 0, got "
                            f"{self.weight!r}", reason="bad_value", field="weight")
        for name in ("num_samples", "eval_count"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                          and value >= 0):
                raise DataError(f"{where}: field '{name}' must be an integer >= 0, got "
                                f"{value!r}", reason="bad_value", field=name)
        if self.eval_fraction is not None and not (isinstance(self.eval_fraction, (int, float))
                                                   and 0 <= self.eval_fraction < 1):
            raise DataError(f"{where}: field 'eval_fraction' must be in [0, 1), got "
                            f"{self.eval_fraction!r}", reason="bad_value", field="eval_fraction")
        if self.eval_fraction is not None and self.eval_count is not None:
            raise DataError(f"{where}: give at most one of 'eval_fraction' and 'eval_count'",
                            reason="bad_value", field="eval_fraction")
        if self.split == "eval" and (self.weight is not None or self.num_samples is not None
                                     or self.eval_fraction or self.eval_count):
            raise DataError(f"{where}: an eval source takes no weight, num_samples or eval "
                            f"hold-out", reason="bad_value", field="split")

    @property
    def label(self) -> str:
        """How errors and the manifest name this source."""
        if self.path is not None:
            return self.path
        extra = f"/{self.dataset_config}" if self.dataset_config else ""
        return f"{self.dataset}{extra}[{self.dataset_split}]"


def parse_input_arg(arg: str, split: str = "train") -> SourceSpec:
    """``PATH`` or ``PATH:TASK`` (``TASK`` defaults to ``instruction``), or ``hf:TASK`` for a
    commonsense task's public dataset (its train split, or its eval split when split='eval')."""
    origin = "--eval-input" if split == "eval" else "--input"
    if arg.startswith("hf:"):
        kind = arg[3:]
        spec = TASKS.get(kind)
        if spec is None:
            raise DataError(f"{origin} {arg}: unknown task {kind!r}; expected one of "
                            f"{sorted(TASKS)}", reason="unknown_task", field="task")
        return SourceSpec(kind=kind, dataset=spec.hf_path, dataset_config=spec.hf_config,
                          dataset_split=spec.train_split if split == "train" else spec.eval_split,
                          split=split, origin=f"{origin} {arg}")
    path, kind = arg, "instruction"
    head, sep, tail = arg.rpartition(":")
    # A trailing ":name" without a path separator is a task; anything else is part of the path.
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        path, kind = head, tail
    return SourceSpec(kind=kind, path=path, split=split, origin=f"{origin} {arg}")


_MIXTURE_SOURCE_KEYS = {"path", "task", "name", "split", "weight", "num_samples", "eval_path",
                        "eval_fraction", "eval_count", "dataset", "dataset_config",
                        "dataset_split", "eval_dataset_split"}


def load_mixture(path: str | os.PathLike) -> tuple[list[SourceSpec], dict[str, Any]]:
    """Read a YAML mixture file: ``sources:`` (list) plus optional run settings (tokenizer,
    seq_len, seed, ...). Relative paths resolve against the mixture file's directory.
    Returns (sources, settings)."""
    import yaml

    mpath = Path(path)
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{mpath}: mixture file not found", reason="missing_file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{mpath}: invalid UTF-8 at byte {e.start}", reason="bad_utf8") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise DataError(f"{mpath}{at}: invalid YAML: {getattr(e, 'problem', e)}",
                        reason="bad_yaml") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise DataError(f"{mpath}: a mixture file is a mapping with a non-empty 'sources' list",
                        reason="bad_value", field="sources")
    base = mpath.parent
    sources: list[SourceSpec] = []
    for i, entry in enumerate(doc["sources"]):
        where = f"{mpath}: sources[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be a mapping", reason="bad_type", field=f"sources[{i}]")
        unknown = sorted(set(entry) - _MIXTURE_SOURCE_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {unknown}; known: "
                            f"{sorted(_MIXTURE_SOURCE_KEYS)}", reason="bad_value",
                            field=f"sources[{i}].{unknown[0]}")
        kind = entry.get("task", "instruction")
        if not isinstance(kind, str):
            raise DataError(f"{where}: field 'task' must be a string", reason="bad_type",
                            field=f"sources[{i}].task")
        dataset = entry.get("dataset")
        if dataset is True:  # the task's own public dataset
            if kind not in TASKS:
                raise DataError(f"{where}: 'dataset: true' needs a commonsense task, got "
                                f"{kind!r}", reason="bad_value", field=f"sources[{i}].dataset")
        common = dict(kind=kind, task=entry.get("name"), origin=where)
        spec_path = _resolve(base, entry.get("path"), where, "path")
        sources.append(SourceSpec(
            path=spec_path, split=entry.get("split", "train"), weight=entry.get("weight"),
            num_samples=entry.get("num_samples"), eval_fraction=entry.get("eval_fraction"),
            eval_count=entry.get("eval_count"), **_dataset_fields(entry, kind, "train"), **common))
        eval_path = _resolve(base, entry.get("eval_path"), where, "eval_path")
        if eval_path is not None:
            sources.append(SourceSpec(path=eval_path, split="eval", **common))
        elif entry.get("eval_dataset_split") is not None:
            sources.append(SourceSpec(split="eval", **_dataset_fields(entry, kind, "eval"),
                                      **common))
    settings = {k: v for k, v in doc.items() if k != "sources"}
    return sources, settings


def _resolve(base: Path, value: Any, where: str, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty string", reason="bad_type",
                        field=name)
    p = Path(value)
    return str(p if p.is_absolute() else base / p)


def _dataset_fields(entry: dict[str, Any], kind: str, split: str) -> dict[str, Any]:
    dataset = entry.get("dataset")
    if dataset is None:
        return {}
    spec = TASKS.get(kind)
    if dataset is True and spec is not None:
        name, config = spec.hf_path, spec.hf_config
        default_split = spec.train_split if split == "train" else spec.eval_split
    else:
        name, config, default_split = dataset, None, "train" if split == "train" else "validation"
    key = "dataset_split" if split == "train" else "eval_dataset_split"
    return {"dataset": name, "dataset_config": entry.get("dataset_config", config),
            "dataset_split": entry.get(key) or default_split}


# --------------------------------------------------------------------------- scanning
@dataclass
class Chunk:
    """A unit of work: consecutive records of one source. Exactly one payload is set: a byte
    range of a JSON Lines file, a list of parsed records, or an Arrow record batch."""

    source: int
    first_ordinal: int
    count: int
    start: int = 0
    end: int = 0
    first_line: int = 1
    records: list[Any] | None = None
    lines: list[int] | None = None   # line of each record (JSON arrays)
    batch: Any = None


@dataclass
class SourcePlan:
    spec: SourceSpec
    index: int
    fmt: str                   # jsonl | json | parquet | dataset
    sha256: str
    num_bytes: int
    num_records: int
    chunks: list[Chunk] = field(default_factory=list)
    lazy: Any = None           # a dataset object read lazily into chunks

    def manifest_entry(self) -> dict[str, Any]:
        s = self.spec
        entry: dict[str, Any] = {"source": s.label, "format": self.fmt, "sha256": self.sha256,
                                 "bytes": self.num_bytes, "records": self.num_records,
                                 "task": s.task, "kind": s.kind, "split": s.split}
        for name in ("weight", "num_samples", "eval_fraction", "eval_count"):
            value = getattr(s, name)
            if value is not None:
                entry[name] = value
        return entry


def detect_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".json"):
        # A .json file holds either one array of records or (often) JSON Lines.
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json" if head.startswith(b"[") else "jsonl"
    raise DataError(f"{path}: unsupported file type; expected .jsonl, .ndjson, .json or .parquet",
                    reason="bad_format")


def plan_source(spec: SourceSpec, index: int, chunk_bytes: int, chunk_records: int) -> SourcePlan:
    """Scan one source: hash, count records, cut chunks. Raises DataError for a missing,
    unreadable or empty input."""
    if spec.dataset is not None:
        return _plan_dataset(spec, index, chunk_records)
    path = spec.path
    assert path is not None
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found ({spec.origin})", reason="missing_file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file ({spec.origin})", reason="missing_file")
    fmt = detect_format(path)
    if fmt == "jsonl":
        plan = _plan_jsonl(spec, index, path, chunk_bytes)
    elif fmt == "json":
        plan = _plan_json(spec, index, path, chunk_records)
    else:
        plan = _plan_parquet(spec, index, path, chunk_records)
    if plan.num_records == 0:
        raise DataError(f"{path}: empty file (no records)", reason="empty_file")
    return plan


def _plan_jsonl(spec: SourceSpec, index: int, path: str, chunk_bytes: int) -> SourcePlan:
    sha = hashlib.sha256()
    chunks: list[Chunk] = []
    buf = b""
    buf_start = 0     # file offset of buf[0]
    line = 1          # line number of buf[0]
    ordinal = 0       # records (non-blank lines) before buf[0]
    size = 0
    with open(path, "rb") as f:
        eof = False
        while not eof:
            block = f.read(_READ_BLOCK)
            eof = not block
            sha.update(block)
            size += len(block)
            buf += block
            while buf:
                cut = buf.find(b"\n", max(chunk_bytes - 1, 0))
                if cut < 0:
                    if not eof:
                        break         # read more before cutting
                    cut = len(buf) - 1
                piece = buf[: cut + 1]
                count = sum(map(bool, map(bytes.strip, piece.split(b"\n"))))
                if count:
                    chunks.append(Chunk(source=index, first_ordinal=ordinal, count=count,
                                        start=buf_start, end=buf_start + len(piece),
                                        first_line=line))
                ordinal += count
                line += piece.count(b"\n")
                buf_start += len(piece)
                buf = buf[cut + 1:]
    return SourcePlan(spec, index, "jsonl", sha.hexdigest(), size, ordinal, chunks)


def _plan_json(spec: SourceSpec, index: int, path: str, chunk_records: int) -> SourcePlan:
    # A JSON array cannot be streamed with the standard library: it is parsed here once and its
    # records are handed to the workers in chunks, each with the line it starts on.
    with open(path, "rb") as f:
        raw = f.read()
    records, lines = _parse_json_array(_decode_utf8(raw, path), path)
    chunks = [Chunk(source=index, first_ordinal=i, count=len(records[i:i + chunk_records]),
                    records=records[i:i + chunk_records], lines=lines[i:i + chunk_records])
              for i in range(0, len(records), chunk_records)]
    return SourcePlan(spec, index, "json", hashlib.sha256(raw).hexdigest(), len(raw),
                      len(records), chunks)


def _parse_json_array(text: str, path: str) -> tuple[list[Any], list[int]]:
    """The elements of a top-level JSON array and the line each starts on."""
    decoder = json.JSONDecoder()
    records: list[Any] = []
    lines: list[int] = []

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def fail(pos: int, msg: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return DataError(f"{path}:{line}: malformed JSON at column {col}: {msg}",
                         reason="bad_json")

    pos = skip(0)
    if not text.startswith("[", pos):
        raise DataError(f"{path}: a .json file must hold an array of records (or be JSON Lines)",
                        reason="bad_type")
    pos = skip(pos + 1)
    line, counted = 1, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from None
            line += text.count("\n", counted, pos)
            counted = pos
            records.append(record)
            lines.append(line)
            pos = skip(end)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise fail(pos, "expected ',' or ']' after a record")
    if skip(pos) != len(text):
        raise fail(skip(pos), "extra data after the array")
    return records, lines


def _plan_parquet(spec: SourceSpec, index: int, path: str, chunk_records: int) -> SourcePlan:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        num_rows = pf.metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file: {e}", reason="bad_parquet") from None
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            sha.update(block)
            size += len(block)
    plan = SourcePlan(spec, index, "parquet", sha.hexdigest(), size, num_rows)
    plan.lazy = ("parquet", path, chunk_records)
    return plan


def _plan_dataset(spec: SourceSpec, index: int, chunk_records: int) -> SourcePlan:
    try:
        import datasets

        ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.dataset_split)
    except Exception as e:  # offline, unknown name, ...: report, do not guess
        raise DataError(f"{spec.label}: could not load dataset by name ({spec.origin}): "
                        f"{type(e).__name__}: {e}", reason="missing_dataset") from None
    fingerprint = getattr(ds, "_fingerprint", None) or spec.label
    plan = SourcePlan(spec, index, "dataset", hashlib.sha256(str(fingerprint).encode()).hexdigest(),
                      0, len(ds))
    plan.lazy = ("dataset", ds, chunk_records)
    if plan.num_records == 0:
        raise DataError(f"{spec.label}: dataset split is empty", reason="empty_file")
    return plan


def iter_plan_chunks(plan: SourcePlan) -> Iterator[Chunk]:
    """The chunks of a source, reading lazily where the payload is data (parquet, datasets)."""
    if plan.lazy is None:
        yield from plan.chunks
        return
    kind, obj, chunk_records = plan.lazy
    if kind == "parquet":
        import pyarrow.parquet as pq

        ordinal = 0
        for batch in pq.ParquetFile(obj).iter_batches(batch_size=chunk_records):
            yield Chunk(source=plan.index, first_ordinal=ordinal, count=batch.num_rows,
                        batch=batch)
            ordinal += batch.num_rows
    else:
        for i in range(0, len(obj), chunk_records):
            part = obj[i:i + chunk_records]  # dict of columns
            keys = list(part)
            rows = [dict(zip(keys, values)) for values in zip(*(part[k] for k in keys))]
            yield Chunk(source=plan.index, first_ordinal=i, count=len(rows), records=rows)


# --------------------------------------------------------------------------- reading
def _decode_utf8(raw: bytes, path: str, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {raw[e.start]:#04x} at column {col})",
                        reason="bad_utf8") from None


def _is_blank(line: str | bytes) -> bool:
    """ASCII whitespace only, as the scan counts records (bytes.strip), so ordinals agree. Only
    a line that starts with whitespace pays for the (copying) strip."""
    if not line:
        return True
    if line[0] not in _BLANK_FIRST:
        return False
    return not (line.strip(_ASCII_SPACE) if isinstance(line, str) else line.strip())


def iter_chunk_records(chunk: Chunk, label: str) -> Iterator[tuple[int, str, Any]]:
    """Yield (ordinal, where, record) for the records of a chunk. A record that cannot be read
    (bad UTF-8, malformed JSON) is yielded as a DataError instance in place of the record so the
    caller decides between failing and skipping."""
    if chunk.records is not None:
        for i, record in enumerate(chunk.records):
            where = (f"{label}:{chunk.lines[i]}" if chunk.lines is not None
                     else f"{label}: row {chunk.first_ordinal + i}")
            yield chunk.first_ordinal + i, where, record
        return
    if chunk.batch is not None:
        for i, record in enumerate(chunk.batch.to_pylist()):
            yield chunk.first_ordinal + i, f"{label}: row {chunk.first_ordinal + i}", record
        return
    with open(label, "rb") as f:
        f.seek(chunk.start)
        raw = f.read(chunk.end - chunk.start)
    if chunk.start == 0 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        lines: list[Any] = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = raw.split(b"\n")  # find the bad line(s) one by one below
    ordinal = chunk.first_ordinal
    loads = json.loads
    for offset, line in enumerate(lines):
        if _is_blank(line):
            continue
        where = f"{label}:{chunk.first_line + offset}"
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield ordinal, where, DataError(
                    f"{where}: invalid UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})",
                    reason="bad_utf8")
                ordinal += 1
                continue
        try:
            record = loads(line)
        except json.JSONDecodeError as e:
            record = DataError(f"{where}: malformed JSON at column {e.colno}: {e.msg}",
                               reason="bad_json")
        yield ordinal, where, record
        ordinal += 1
