"""Bad input: a clear error naming file, line and field, a non-zero exit, no partial output, an
earlier output left intact; with --skip-invalid, counts per file and reason in the manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data.conftest import REPO, load_manifest, run_prepare, tree_bytes

GOOD_ARC = {"question": "Which is a fruit?",
            "choices": {"label": ["A", "B"], "text": ["apple", "dog"]}, "answerKey": "A"}


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                    for r in records)


# (name, file name, file bytes, task, expected message fragment)
CASES = [
    ("malformed_json", "bad.jsonl", jsonl(GOOD_ARC, GOOD_ARC, b'{"question": "x",'), "arc-e",
     "bad.jsonl:3: malformed JSON"),
    ("missing_field", "bad.jsonl", jsonl(GOOD_ARC, {"question": "q", "choices": GOOD_ARC["choices"]}),
     "arc-e", "bad.jsonl:2: missing field 'answerKey'"),
    ("mistyped_field", "bad.jsonl", jsonl({"question": "is it", "answer": "yes"}), "boolq",
     "bad.jsonl:1: field 'answer' must be a boolean, got string"),
    ("unknown_label", "bad.jsonl", jsonl(GOOD_ARC, {**GOOD_ARC, "answerKey": "C"}), "arc-e",
     "bad.jsonl:2: field 'answerKey': unknown label 'C'"),
    ("empty_file", "empty.jsonl", b"", "arc-e", "empty.jsonl: empty file"),
    ("blank_lines_only", "blank.jsonl", b"\n  \n\n", "arc-e", "blank.jsonl: empty file"),
    ("invalid_utf8", "bad.jsonl", jsonl(GOOD_ARC) + b'{"question": "caf\xe9?"}\n', "arc-e",
     "bad.jsonl:2: invalid UTF-8"),
    ("json_array_syntax", "bad.json", b'[\n {"instruction": "a", "output": "b"},\n {"x": ]\n]',
     "alpaca", "bad.json:3: malformed JSON"),
    ("json_array_record", "bad.json",
     b'[\n {"instruction": "a", "output": "b"},\n\n {"instruction": 3}\n]', "alpaca",
     "bad.json:4: field 'instruction' must be a string"),
    ("json_array_trailing", "bad.json", b'[{"instruction": "a", "output": "b"}]\n]', "alpaca",
     "bad.json:2: malformed JSON at column 1: extra data"),
    ("json_not_object", "bad.json", b' \n"text"', "alpaca",
     "bad.json:2: record must be a JSON object, got string"),
    ("not_instruction", "bad.jsonl", jsonl({"text": "hello"}), "instruction",
     "bad.jsonl:1: not an instruction record"),
    ("unsupported_type", "data.csv", b"a,b\n", "arc-e", "data.csv: unsupported file type"),
]


@pytest.mark.parametrize("name,filename,content,task,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_file(tmp_path, tokenizer_dir, capsys, name, filename, content, task, fragment):
    path = tmp_path / filename
    path.write_bytes(content)
    out = tmp_path / "out"
    code = run_prepare("--input", f"{path}:{task}", "--tokenizer", tokenizer_dir, "--seq-len", 128,
                       "--out", out)
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err, err
    assert str(tmp_path) in err                     # the file is named by its path
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename]  # no output, no temp dir


def test_bad_parquet_row(tmp_path, tokenizer_dir, capsys):
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
            {"goal": "g", "sol1": "a", "sol2": "b", "label": 5}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    code = run_prepare("--input", f"{tmp_path / 'p.parquet'}:piqa", "--tokenizer", tokenizer_dir,
                       "--seq-len", 128, "--out", tmp_path / "out")
    assert code == 2
    assert "p.parquet: row 1: field 'label': unknown label 5" in capsys.readouterr().err


@pytest.mark.parametrize("arg,fragment", [
    ("{data}:arc-x", "unknown task 'arc-x'"),
    ("{missing}:arc-e", "missing.jsonl: file not found"),
])
def test_bad_input_argument(tmp_path, tokenizer_dir, capsys, arg, fragment):
    data = tmp_path / "ok.jsonl"
    data.write_bytes(jsonl(GOOD_ARC))
    code = run_prepare("--input", arg.format(data=data, missing=tmp_path / "missing.jsonl"),
                       "--tokenizer", tokenizer_dir, "--seq-len", 128, "--out", tmp_path / "out")
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tokenizer_directory_that_does_not_load(tmp_path, capsys):
    data = tmp_path / "ok.jsonl"
    data.write_bytes(jsonl(GOOD_ARC))
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    for tok, fragment in ((tmp_path / "nowhere", "tokenizer directory does not exist"),
                          (broken, "tokenizer directory could not be loaded")):
        code = run_prepare("--input", f"{data}:arc-e", "--tokenizer", tok, "--seq-len", 128,
                           "--out", tmp_path / "out")
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and str(tok) in err
        assert not (tmp_path / "out").exists()


def test_failed_run_leaves_earlier_output_intact(tmp_path, tokenizer_dir, capsys):
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(GOOD_ARC, {**GOOD_ARC, "answerKey": "B"}))
    out = tmp_path / "out"
    args = ["--tokenizer", tokenizer_dir, "--seq-len", 128, "--out", out]
    assert run_prepare("--input", f"{good}:arc-e", *args) == 0
    before = tree_bytes(out)
    # Without --overwrite an existing output is refused.
    assert run_prepare("--input", f"{good}:arc-e", *args) == 2
    assert "already exists" in capsys.readouterr().err
    # A run that fails half-way (the bad record comes after good ones) changes nothing.
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(*[GOOD_ARC] * 50, b"{oops"))
    assert run_prepare("--input", f"{good}:arc-e", "--input", f"{bad}:arc-e", "--overwrite",
                       *args) == 2
    assert "bad.jsonl:51: malformed JSON" in capsys.readouterr().err
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]
    # A successful --overwrite replaces it.
    assert run_prepare("--input", f"{good}:arc-e", "--input", f"{good}:arc-e", "--overwrite",
                       *args) == 0
    assert load_manifest(out)["splits"]["train"]["examples"] == 4


def test_skip_invalid_counts_per_file_and_reason(tmp_path, tokenizer_dir, capsys):
    a = tmp_path / "a.jsonl"
    a.write_bytes(jsonl(GOOD_ARC, b"{broken", {**GOOD_ARC, "answerKey": "Z"}, GOOD_ARC,
                        b'{"question": "\xff"}', {"question": "q"}, b"[1, 2"))
    b = tmp_path / "b.jsonl"
    b.write_bytes(jsonl({"question": "is it", "answer": True}, {"question": "is it", "answer": 1}))
    out = tmp_path / "out"
    assert run_prepare("--input", f"{a}:arc-e", "--input", f"{b}:boolq", "--tokenizer",
                       tokenizer_dir, "--seq-len", 128, "--out", out, "--skip-invalid") == 0
    summary = capsys.readouterr().out
    m = load_manifest(out)
    assert m["skipped"] == {"total": 6, "by_file": {
        str(a): {"bad_json": 2, "bad_utf8": 1, "missing_field": 1, "unknown_label": 1},
        str(b): {"bad_type": 1}}}
    assert m["inputs"][0]["skipped"] == m["skipped"]["by_file"][str(a)]
    assert m["splits"]["train"]["tasks"]["arc-e"]["examples"] == 2
    assert m["splits"]["train"]["tasks"]["boolq"]["examples"] == 1
    assert "skipped 6 invalid records" in summary and f"{b}: bad_type: 1" in summary


def test_mixture_file_errors(tmp_path, tokenizer_dir, capsys):
    mix = tmp_path / "mix.yaml"
    for text, fragment in (
        ("sources:\n  - {path: x.jsonl, task: arc-e, wieght: 2}\n", "sources[0]: unknown field"),
        ("sources:\n  - {path: x.jsonl, task: arc-e, weight: -1}\n", "field 'weight'"),
        ("sources: [\n", "mix.yaml:"),
        ("seq_len: 64\n", "non-empty 'sources' list"),
        ("colour: 3\nsources:\n  - {path: x.jsonl, task: arc-e}\n", "unknown setting(s) ['colour']"),
    ):
        mix.write_text(text)
        code = run_prepare("--mixture", mix, "--tokenizer", tokenizer_dir, "--seq-len", 64,
                           "--out", tmp_path / "out")
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and str(mix) in err, (text, err)


def test_dataset_by_name_offline_is_a_clear_error(tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    code = run_prepare("--input", "hf:arc-e", "--tokenizer", tokenizer_dir, "--seq-len", 64,
                       "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and "allenai/ai2_arc/ARC-Easy[train]: could not load dataset by name" in err


def test_cli_exit_status_in_a_fresh_process(tmp_path, tokenizer_dir):
    """The script as users run it: non-zero exit and the message on stderr."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(GOOD_ARC, {"question": "q", "choices": {"label": ["A"], "text": "x"},
                                     "answerKey": "A"}))
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / "prepare.py"), "--input",
                           f"{bad}:arc-e", "--tokenizer", str(tokenizer_dir), "--seq-len", "64",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert f"{bad}:2: field 'choices': field 'label' must have 2 to 9 entries" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_mid_run_leaves_no_output(tmp_path, sample, tokenizer_dir):
    """A batch scheduler's SIGTERM during the run: exit 130, temporary directory removed, no
    output, no worker left behind."""
    import os
    import signal
    import time

    import psutil

    from tests.data.conftest import read_records

    records = read_records(sample["paths"]["alpaca"]["train"])
    big = tmp_path / "big.jsonl"
    big.write_bytes(jsonl(*(records * 60)))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "data_prep" / "prepare.py"), "--input",
                             f"{big}:alpaca", "--tokenizer", str(tokenizer_dir), "--seq-len", "512",
                             "--out", str(out), "--num-proc", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the signal"
        time.sleep(0.01)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]
    psutil.wait_procs(children, timeout=30)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_mistyped_settings(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "ok.jsonl"
    data.write_bytes(jsonl(GOOD_ARC))
    mix = tmp_path / "mix.yaml"
    for setting, fragment in (("append_eos: 'yes'", "setting 'append_eos': must be true or false"),
                              ("seq_len: 1", "setting 'seq_len': must be an integer >= 2"),
                              ("overlong: cut", "setting 'overlong': must be one of")):
        mix.write_text(f"{setting}\nsources:\n  - {{path: {data}, task: arc-e}}\n")
        code = run_prepare("--mixture", mix, "--tokenizer", tokenizer_dir, "--out", tmp_path / "o",
                           *(["--seq-len", "64"] if "seq_len" not in setting else []))
        assert code == 2 and fragment in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_sigterm_handler_stops_a_forked_worker_at_once():
    """A pool worker forked before its initializer ran still has the job's SIGTERM handler; the
    pool's shutdown terminates it, and it must die (exit 143), not unwind like the job, which an
    at-fork hook can swallow and so leave the pool's shutdown waiting for ever (seen in CI)."""
    import multiprocessing as mp
    import signal

    from data_prep import prepare as prepare_cli
    from mixlora_ds.data.pipeline import _STOP, clear_stop

    worker = mp.get_context("fork").Process(target=prepare_cli._exit_on_sigterm, args=(signal.SIGTERM, None))
    worker.start()
    worker.join(timeout=60)
    assert worker.exitcode == 128 + signal.SIGTERM
    try:  # in the job's own process: stop requested, unwinding like Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            prepare_cli._exit_on_sigterm(signal.SIGTERM, None)
        assert _STOP.is_set()
    finally:
        clear_stop()


def test_sigterm_while_workers_are_forked_only_requests_the_stop():
    """While the pool forks its workers the handler must not raise (at-fork hooks could swallow the
    exception or be left half-done); the pipeline checks for the stop right after."""
    import signal

    from data_prep import prepare as prepare_cli
    from mixlora_ds.data import pipeline

    try:
        pipeline._FORKING.set()
        prepare_cli._exit_on_sigterm(signal.SIGTERM, None)  # no KeyboardInterrupt
        assert pipeline._STOP.is_set()
        pipeline._FORKING.clear()
        with pytest.raises(KeyboardInterrupt):
            pipeline._check_stop()
    finally:
        pipeline._FORKING.clear()
        pipeline.clear_stop()
