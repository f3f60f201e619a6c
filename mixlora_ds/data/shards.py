"""On-disk layout of prepared data, written atomically, and read back memory-mapped.

    OUT/manifest.json
    OUT/<split>/<shard:05d>/input_ids.npy      [R, S] uint16|int32   token ids, pad_id after the
                                                                     last example of a row
    OUT/<split>/<shard:05d>/loss_mask.npy      [R, S] uint8          1 = trained token
    OUT/<split>/<shard:05d>/row_ptr.npy        [R+1] int64           examples of row r:
                                                                     row_ptr[r]:row_ptr[r+1]
    OUT/<split>/<shard:05d>/example_lens.npy   [N] int32             example lengths, row order
    OUT/<split>/<shard:05d>/example_tasks.npy  [N] int16             task id (manifest "tasks")
    OUT/<split>/<shard:05d>/example_sources.npy [N] int32            input index (manifest)
    OUT/<split>/<shard:05d>/example_ordinals.npy [N] int64           record index in that input

Everything is written under a temporary sibling directory that is renamed to OUT only after the
manifest is written, so a failed or interrupted run never leaves a directory that looks complete
and never touches an earlier OUT. The rename never replaces a directory another job published
meanwhile, and ``--overwrite`` replaces only an earlier prepare output. No timestamps or
process-dependent values are written: the same inputs and settings give byte-identical output.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.packing import PackedRows
from mixlora_ds.utils.atomic import rename_noreplace

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ROW_FILES = ("input_ids", "loss_mask")
EXAMPLE_FILES = ("example_lens", "example_tasks", "example_sources", "example_ordinals")


# What a prepare output holds: --overwrite replaces a directory only when it holds nothing else.
OUTPUT_ENTRIES = {MANIFEST, "train", "eval"}


def _describe(path: Path, limit: int = 5) -> str:
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown or "nothing"


def _not_a_directory(out: Path) -> DataError:
    kind = "a symbolic link" if out.is_symlink() else "an existing file"
    return DataError(f"{out}: --out is {kind}, not a directory; choose another --out (nothing "
                     f"was replaced)", reason="exists", field="out")


def check_replaceable_output(out: Path) -> None:
    """Refuse to replace ``out`` unless it is a previous prepare output and nothing else: a
    directory holding a manifest written by prepare, and only what prepare writes."""
    if out.is_symlink() or not out.is_dir():
        raise _not_a_directory(out)
    manifest = out / MANIFEST
    try:
        is_prepared = isinstance(json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer"),
                                 dict)
    except (OSError, ValueError, AttributeError):
        is_prepared = False
    extra = sorted(set(os.listdir(out)) - OUTPUT_ENTRIES)
    if not is_prepared or extra:
        what = (f"entries prepare does not write ({', '.join(extra[:5])}"
                f"{', ...' if len(extra) > 5 else ''})" if is_prepared else
                f"no manifest written by prepare (it holds: {_describe(out)})")
        raise DataError(f"{out}: --overwrite replaces only a previous prepare output, and this "
                        f"directory has {what}; choose another --out or move those files away",
                        reason="exists", field="out")


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it is published as ``out``.

    On any exception the temporary directory is removed and ``out`` is left as it was. Publishing
    never replaces what it did not check: without ``overwrite`` the final rename fails if anything
    appeared at ``out`` meanwhile (another job finishing first); with it, only the prepare output
    found at the start (same inode) is replaced, and a second job's output is never."""
    out = Path(out)
    replaced_inode = None
    if os.path.lexists(out):
        if not overwrite:
            if out.is_dir() and not out.is_symlink():
                kind = ("a previous prepare output: pass --overwrite to replace it"
                        if (out / MANIFEST).is_file() else
                        f"not a prepare output; it holds: {_describe(out)}")
                raise DataError(f"{out}: output directory already exists ({kind})",
                                reason="exists", field="out")
            raise _not_a_directory(out)
        check_replaceable_output(out)
        replaced_inode = os.stat(out).st_ino
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if replaced_inode is not None:
            _move_aside(out, replaced_inode)
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise DataError(f"{out}: another job published its output there while this one ran; "
                            f"it was left in place and this run's output discarded (rerun with "
                            f"another --out, or --overwrite to replace it)", reason="exists",
                            field="out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_aside(out: Path, expected_inode: int) -> None:
    """Remove the prepare output that was checked at the start, and only that one.

    It is first renamed to a private name (one atomic step, so another job cannot slip a new
    output in between the check and the removal); if what moved is not the directory checked at
    the start, it is put back and the run fails."""
    aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(out, aside)
    except FileNotFoundError:
        return  # another job removed it already; the no-replace rename decides who publishes
    if os.stat(aside).st_ino != expected_inode:
        try:
            rename_noreplace(aside, out)
        except FileExistsError:
            pass  # a third job published meanwhile; the moved one stays at ``aside``
        raise DataError(f"{out}: another job replaced the output while this one ran; it was "
                        f"left in place and this run's output discarded", reason="exists",
                        field="out")
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    # Data must be on disk before the rename publishes it (a crash could otherwise leave a
    # complete-looking directory of truncated files).
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class ShardWriter:
    """Accumulates packed rows of one split and writes shards of ``rows_per_shard`` rows."""

    def __init__(self, split_dir: Path, rows_per_shard: int) -> None:
        self.split_dir = split_dir
        self.rows_per_shard = rows_per_shard
        self.shards: list[dict[str, Any]] = []
        self._parts: list[PackedRows] = []
        self._rows = 0

    def add(self, rows: PackedRows) -> None:
        self._parts.append(rows)
        self._rows += rows.num_rows
        while self._rows >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def close(self) -> list[dict[str, Any]]:
        if self._rows:
            self._write(self._rows)
        return self.shards

    def _write(self, num_rows: int) -> None:
        merged = _concat_rows(self._parts)
        head, tail = _split_rows(merged, num_rows)
        self._parts = [tail] if tail.num_rows else []
        self._rows = tail.num_rows
        name = f"{len(self.shards):05d}"
        d = self.split_dir / name
        d.mkdir(parents=True)
        np.save(d / "input_ids.npy", head.input_ids_RS)
        np.save(d / "loss_mask.npy", head.loss_mask_RS)
        np.save(d / "row_ptr.npy", head.row_ptr)
        np.save(d / "example_lens.npy", head.example_lens)
        np.save(d / "example_tasks.npy", head.example_tasks)
        np.save(d / "example_sources.npy", head.example_sources)
        np.save(d / "example_ordinals.npy", head.example_ordinals)
        self.shards.append({"name": name, "rows": head.num_rows,
                            "examples": int(head.example_lens.shape[0]),
                            "max_token_id": int(head.input_ids_RS.max())})


def _concat_rows(parts: list[PackedRows]) -> PackedRows:
    if len(parts) == 1:
        return parts[0]
    ptrs, offset = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        ptrs.append(p.row_ptr[1:] + offset)
        offset += int(p.row_ptr[-1])
    return PackedRows(
        input_ids_RS=np.concatenate([p.input_ids_RS for p in parts]),
        loss_mask_RS=np.concatenate([p.loss_mask_RS for p in parts]),
        row_ptr=np.concatenate(ptrs),
        example_lens=np.concatenate([p.example_lens for p in parts]),
        example_tasks=np.concatenate([p.example_tasks for p in parts]),
        example_sources=np.concatenate([p.example_sources for p in parts]),
        example_ordinals=np.concatenate([p.example_ordinals for p in parts]),
    )


def _split_rows(rows: PackedRows, k: int) -> tuple[PackedRows, PackedRows]:
    e = int(rows.row_ptr[k])

    def part(r0: int, r1: int, e0: int, e1: int) -> PackedRows:
        return PackedRows(rows.input_ids_RS[r0:r1], rows.loss_mask_RS[r0:r1],
                          rows.row_ptr[r0:r1 + 1] - rows.row_ptr[r0], rows.example_lens[e0:e1],
                          rows.example_tasks[e0:e1], rows.example_sources[e0:e1],
                          rows.example_ordinals[e0:e1])

    return part(0, k, 0, e), part(k, rows.num_rows, e, int(rows.row_ptr[-1]))


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out / MANIFEST).write_text(text, encoding="utf-8")


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir}: not a prepared data directory (no {MANIFEST}); run "
                        f"mixlora-prepare first", reason="missing_file")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}", reason="bad_json") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: field 'format_version': {manifest.get('format_version')!r} "
                        f"is not supported (expected {FORMAT_VERSION})", reason="bad_value",
                        field="format_version")
    return manifest


def open_shard(data_dir: str | os.PathLike, split: str, name: str) -> dict[str, np.ndarray]:
    """The arrays of one shard, memory-mapped (row arrays) or loaded (small example arrays)."""
    d = Path(data_dir) / split / name
    arrays = {f: np.load(d / f"{f}.npy", mmap_mode="r") for f in ROW_FILES}
    arrays["row_ptr"] = np.load(d / "row_ptr.npy")
    for f in EXAMPLE_FILES:
        arrays[f] = np.load(d / f"{f}.npy")
    return arrays


def max_token_id(data_dir: str | os.PathLike, manifest: dict[str, Any], split: str) -> int | None:
    """The largest token id (padding included) in ``split``, None when the split has no rows.

    Recorded by prepare in each shard's manifest entry; for outputs of earlier versions it is
    read from the memory-mapped shards (one pass over the token ids)."""
    shards = manifest.get("splits", {}).get(split, {}).get("shards", [])
    ids = []
    for shard in shards:
        if "max_token_id" in shard:
            ids.append(int(shard["max_token_id"]))
        else:
            tokens = np.load(Path(data_dir) / split / shard["name"] / "input_ids.npy", mmap_mode="r")
            if tokens.size:
                ids.append(int(tokens.max()))
    return max(ids) if ids else None
