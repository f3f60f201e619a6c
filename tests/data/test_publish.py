"""Publishing a prepare output: --overwrite replaces only an earlier prepare output, an --out that
is a file is refused as a file, and two jobs racing to one --out never replace each other's output
(real concurrent prepare processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data.conftest import REPO, load_manifest, run_prepare, tree_bytes

PREPARE = str(REPO / "data_prep" / "prepare.py")


def small_args(sample, tokenizer_dir, out, seq_len=256):
    return ["--input", f"{sample['paths']['arc-e']['train']}:arc-e", "--tokenizer", tokenizer_dir,
            "--seq-len", seq_len, "--out", out]


def test_overwrite_refuses_a_directory_that_is_not_a_prepare_output(tmp_path, sample, tokenizer_dir,
                                                                    capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "raw.jsonl").write_text('{"question": "mine"}\n')
    (out / "notes.txt").write_text("do not lose me\n")
    before = tree_bytes(out)
    assert run_prepare(*small_args(sample, tokenizer_dir, out), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "replaces only a previous prepare output" in err and "no manifest written by prepare" in err
    assert "notes.txt" in err and "raw.jsonl" in err
    assert tree_bytes(out) == before
    # Without --overwrite the message says what is there too.
    assert run_prepare(*small_args(sample, tokenizer_dir, out)) == 2
    assert "not a prepare output; it holds: notes.txt, raw.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no temporary left behind


def test_overwrite_refuses_a_prepare_output_holding_other_files(tmp_path, sample, tokenizer_dir,
                                                                capsys):
    out = tmp_path / "prepared"
    assert run_prepare(*small_args(sample, tokenizer_dir, out)) == 0
    (out / "my_notes.md").write_text("kept\n")
    before = tree_bytes(out)
    assert run_prepare(*small_args(sample, tokenizer_dir, out, seq_len=128), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "entries prepare does not write (my_notes.md)" in err
    assert tree_bytes(out) == before
    # A plain earlier output is replaced.
    (out / "my_notes.md").unlink()
    assert run_prepare(*small_args(sample, tokenizer_dir, out, seq_len=128), "--overwrite") == 0
    assert load_manifest(out)["seq_len"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_a_file_is_refused_as_a_file(tmp_path, sample, tokenizer_dir, capsys, overwrite):
    out = tmp_path / "out.txt"
    out.write_text("a file\n")
    assert run_prepare(*small_args(sample, tokenizer_dir, out), *(["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err
    assert f"{out}: --out is an existing file, not a directory" in err
    assert "directory already exists" not in err
    assert out.read_text() == "a file\n"


def test_too_short_seq_len_is_named_as_the_cause(tmp_path, sample, tokenizer_dir, capsys):
    assert run_prepare(*small_args(sample, tokenizer_dir, tmp_path / "out", seq_len=2)) == 2
    err = capsys.readouterr().err
    assert "no training examples" in err and "--seq-len 2" in err and "raise --seq-len" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- two real jobs
def _start(args, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, PREPARE, *map(str, args), "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _wait_for_temporary(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``proc`` has passed its start checks and writes its temporary output."""
    prefix = f".{out.name}.tmp-{proc.pid}-"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.name.startswith(prefix) for p in out.parent.iterdir()):
            return
        assert proc.poll() is None, f"prepare exited with {proc.returncode} before writing"
        time.sleep(0.002)
    raise AssertionError("prepare never started writing")


def _race(tmp_path, sample, tokenizer_dir, out, extra=()):
    """Job A passes its checks and is frozen while job B runs to the end; then A finishes."""
    # Many input copies: A's write phase lasts long enough to be caught before it publishes.
    inputs = []
    for _ in range(6):
        for task in ("arc-e", "boolq", "piqa", "siqa"):
            inputs += ["--input", f"{sample['paths'][task]['train']}:{task}"]
    a = _start([*inputs, "--tokenizer", tokenizer_dir, "--seq-len", 256, "--out", out, *extra],
               tmp_path / "a.log")
    try:
        _wait_for_temporary(out, a)
        os.kill(a.pid, signal.SIGSTOP)
        b = _start([*small_args(sample, tokenizer_dir, out, seq_len=128), *extra], tmp_path / "b.log")
        assert b.wait(timeout=180) == 0, (tmp_path / "b.log").read_text()[-3000:]
        published = tree_bytes(out)
        assert load_manifest(out)["seq_len"] == 128
    finally:
        os.kill(a.pid, signal.SIGCONT)
    code = a.wait(timeout=180)
    return code, (tmp_path / "a.log").read_text(), published


def test_concurrent_jobs_to_one_new_out_never_replace_each_other(tmp_path, sample, tokenizer_dir):
    out = tmp_path / "shared"
    code, err, published = _race(tmp_path, sample, tokenizer_dir, out)
    assert code == 2, err
    assert "another job published its output there while this one ran" in err
    assert tree_bytes(out) == published  # B's output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "b.log", "shared"]


def test_concurrent_overwrites_never_replace_the_other_jobs_output(tmp_path, sample, tokenizer_dir):
    out = tmp_path / "shared"
    assert run_prepare(*small_args(sample, tokenizer_dir, out, seq_len=64)) == 0
    code, err, published = _race(tmp_path, sample, tokenizer_dir, out, extra=["--overwrite"])
    assert code == 2, err
    assert "another job replaced the output while this one ran" in err
    assert tree_bytes(out) == published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "b.log", "shared"]
