"""End to end: records -> prepared shards, checked by decoding the shards back.

Every packed example is traced to its input record (the shards store input index and record
ordinal) and compared with an independent tokenization of the reference training text."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixlora_ds.data.pipeline import PrepareConfig, prepare
from mixlora_ds.data.shards import open_shard
from mixlora_ds.data.sources import parse_input_arg
from mixlora_ds.data.templates import TASKS, instruction_segments

from tests.data.conftest import SEQ_LEN, load_manifest, read_records, run_prepare, tree_bytes


def iter_examples(out: Path, split: str) -> Iterator[dict[str, Any]]:
    """Every example of a split: its input, record ordinal, task, token ids and loss mask."""
    manifest = load_manifest(out)
    for shard in manifest["splits"][split]["shards"]:
        arr = open_shard(out, split, shard["name"])
        for r in range(arr["input_ids"].shape[0]):
            lo, hi = arr["row_ptr"][r], arr["row_ptr"][r + 1]
            pos = 0
            for k in range(lo, hi):
                n = int(arr["example_lens"][k])
                yield {"source": manifest["inputs"][arr["example_sources"][k]],
                       "ordinal": int(arr["example_ordinals"][k]),
                       "task": manifest["tasks"][arr["example_tasks"][k]],
                       "ids": arr["input_ids"][r, pos:pos + n].astype(np.int64).tolist(),
                       "mask": arr["loss_mask"][r, pos:pos + n].astype(bool).tolist(),
                       "row": r, "shard": shard["name"]}
                pos += n


def reference_text(kind: str, record: dict) -> tuple[str, list[str]]:
    """(training text, trained pieces), built the way the reference does, not by prepare."""
    if kind in TASKS:
        spec = TASKS[kind]
        return spec.build_prompt(record) + " " + spec.answer_label(record), \
            [spec.answer_label(record)]
    segments = instruction_segments(record)
    return "".join(t for t, _ in segments), [t for t, trained in segments if trained]


_RECORDS: dict[str, list] = {}


def record_of(example: dict[str, Any]) -> dict:
    path = example["source"]["source"]
    if path not in _RECORDS:
        _RECORDS[path] = read_records(Path(path))
    return _RECORDS[path][example["ordinal"]]


def test_round_trip_and_loss_mask(prepared, tokenizer):
    """Shards decode back to exactly the reference text; the loss covers exactly the answer
    tokens and EOS; tokenization equals tokenizing the whole text in one piece."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    checked = Counter()
    for split in ("train", "eval"):
        for ex in iter_examples(prepared, split):
            record = record_of(ex)
            text, trained_pieces = reference_text(ex["source"]["kind"], record)
            ids, mask = ex["ids"], ex["mask"]
            assert ids == tokenizer(text).input_ids + [eos]           # BOS + text + EOS
            assert ids[0] == bos and not mask[0]
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
            trained = [t for t, m in zip(ids, mask) if m]
            assert trained[-1] == eos
            if ex["source"]["kind"] in TASKS or ex["task"] == "alpaca":
                prompt = text[: len(text) - len(trained_pieces[0]) - (ex["task"] in TASKS)]
                n_prompt = len(tokenizer(prompt).input_ids)
                assert ids[:n_prompt] == tokenizer(prompt).input_ids   # prompt tokens untouched
                assert not any(mask[:n_prompt]) and all(mask[n_prompt:])
                assert tokenizer.decode(trained[:-1]) == trained_pieces[0]
            checked[(split, ex["task"])] += 1
    assert checked[("train", "arc-e")] == 240 and checked[("eval", "winogrande")] == 60
    assert checked[("train", "alpaca")] > 0


def test_manifest(prepared, sample, tokenizer_dir):
    m = load_manifest(prepared)
    assert m["seq_len"] == SEQ_LEN and m["append_eos"] and not m["train_on_prompt"]
    assert m["template_version"] and len(m["template_fingerprint"]) == 64
    assert m["seed"] == 42 and m["overlong"] == "truncate"
    tok = m["tokenizer"]
    files = hashlib.sha256()
    for name in tok["files"]:
        files.update(name.encode() + b"\0" + (tokenizer_dir / name).read_bytes() + b"\0")
    assert tok["files_sha256"] == files.hexdigest() and "tokenizer.json" in tok["files"]
    for entry in m["inputs"]:
        assert entry["sha256"] == hashlib.sha256(Path(entry["source"]).read_bytes()).hexdigest()
        assert entry["records_read"] == entry["records"]
    assert m["tasks"] == list(TASKS) + ["alpaca"]
    for split, per_task in (("train", 240), ("eval", 60)):
        info = m["splits"][split]
        for task in TASKS:
            assert info["tasks"][task]["examples"] == per_task
        lens, masks, rows = 0, 0, 0
        for shard in info["shards"]:
            arr = open_shard(prepared, split, shard["name"])
            lens += int(arr["example_lens"].sum())
            masks += int(arr["loss_mask"].sum())
            rows += arr["input_ids"].shape[0]
            assert arr["input_ids"].dtype == np.uint16 and arr["input_ids"].shape[1] == SEQ_LEN
        assert info["tokens"] == lens == sum(t["tokens"] for t in info["tasks"].values())
        assert info["trained_tokens"] == masks and info["rows"] == rows
        assert info["packing_efficiency"] == round(lens / (rows * SEQ_LEN), 6)
        assert info["packing_efficiency"] > 0.85
    # weight 0.5 keeps each Alpaca record with probability 1/2.
    assert 60 < m["splits"]["train"]["tasks"]["alpaca"]["examples"] < 140
    assert "alpaca" not in m["splits"]["eval"]["tasks"]


def _config(tmp_path: Path, tokenizer_dir: Path, inputs: list[str], name: str = "out",
            **kw: Any) -> PrepareConfig:
    return PrepareConfig(sources=[parse_input_arg(a) for a in inputs], tokenizer=str(tokenizer_dir),
                         seq_len=kw.pop("seq_len", 128), out=str(tmp_path / name), progress=False,
                         **kw)


def _mixed_inputs(sample) -> list[str]:
    p = sample["paths"]
    return [f"{p['arc-e']['train']}:arc-e", f"{p['boolq']['train']}:boolq",
            f"{p['hellaswag']['train']}:hellaswag", f"{p['alpaca']['train']}:alpaca"]


def test_deterministic_and_independent_of_process_count(tmp_path, sample, tokenizer_dir,
                                                        monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    inputs = _mixed_inputs(sample)
    # Small chunks and windows: many work units in flight and several packing windows.
    knobs = dict(chunk_bytes=4096, chunk_records=40, pack_window_tokens=3000, rows_per_shard=50)
    outs = []
    for i, num_proc in enumerate((1, 1, 2)):
        cfg = _config(tmp_path, tokenizer_dir, inputs, f"out{i}", num_proc=num_proc, **knobs)
        cfg.sources[0].eval_fraction = 0.1
        cfg.sources[1].num_samples = 300
        prepare(cfg, log=open(tmp_path / f"log{i}", "w"))
        outs.append(tree_bytes(tmp_path / f"out{i}"))
    assert outs[0] == outs[1] == outs[2]
    assert sum(1 for name in outs[0] if name.endswith("input_ids.npy")) > 2  # several shards
    # Another seed holds out other records.
    cfg = _config(tmp_path, tokenizer_dir, inputs, "seed7", seed=7, **knobs)
    cfg.sources[0].eval_fraction = 0.1
    prepare(cfg, log=open(tmp_path / "log_seed", "w"))
    held = {s: {e["ordinal"] for e in iter_examples(tmp_path / s, "eval")} for s in ("out0", "seed7")}
    assert len(held["out0"]) == len(held["seed7"]) == 24 and held["out0"] != held["seed7"]


def test_positions_and_boundaries_through_the_reader(prepared):
    from mixlora_ds.data.reader import IGNORE_INDEX, PackedDataset

    ds = PackedDataset(prepared, "train")
    assert len(ds) == load_manifest(prepared)["splits"]["train"]["rows"]
    for i in range(0, len(ds), 7):
        item, meta = ds[i], ds.examples(i)
        lens = item["seq_lens"].tolist()
        assert lens == meta["lens"].tolist() and sum(lens) <= SEQ_LEN
        pos = 0
        for L, task in zip(lens, meta["tasks"]):
            assert item["position_ids"][pos:pos + L].tolist() == list(range(L))
            assert (item["task_ids"][pos:pos + L] == task).all()
            assert item["labels"][pos] == IGNORE_INDEX  # never predicted across examples
            pos += L
        assert (item["labels"][pos:] == IGNORE_INDEX).all() and (item["task_ids"][pos:] == -1).all()
        assert item["position_ids"][pos:].tolist() == list(range(SEQ_LEN - pos))


def test_train_on_prompt_and_no_eos(tmp_path, sample, tokenizer_dir, tokenizer):
    arc = f"{sample['paths']['arc-e']['train']}:arc-e"
    assert run_prepare("--input", arc, "--tokenizer", tokenizer_dir, "--seq-len", 128,
                       "--out", tmp_path / "out", "--train-on-prompt", "--no-eos") == 0
    m = load_manifest(tmp_path / "out")
    assert m["train_on_prompt"] and not m["append_eos"]
    for ex in iter_examples(tmp_path / "out", "train"):
        text, _ = reference_text("arc-e", record_of(ex))
        assert ex["ids"] == tokenizer(text).input_ids          # no EOS
        assert ex["mask"] == [False] + [True] * (len(ex["ids"]) - 1)


def test_overlong_truncate_and_drop(tmp_path, tokenizer_dir, tokenizer):
    words = " ".join("the cat sat on a mat near the red door".split())
    records = [{"prompt": "Repeat the words:", "response": " " + " ".join([words] * k)}
               for k in (1, 6, 16)]
    records.append({"prompt": " ".join([words] * 12), "response": " ok"})  # prompt too long
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    S = 64
    full = [len(tokenizer(r["prompt"] + r["response"]).input_ids) + 1 for r in records]
    prompt = [len(tokenizer(r["prompt"]).input_ids) for r in records]
    fits = [n <= S for n in full]
    cut = [n > S and p < S for n, p in zip(full, prompt)]      # truncation keeps a response
    lost = [n > S and p >= S for n, p in zip(full, prompt)]    # nothing left to learn
    assert fits[0] and sum(cut) >= 1 and sum(lost) >= 1       # the cases this test needs
    for policy in ("truncate", "drop"):
        out = tmp_path / policy
        assert run_prepare("--input", f"{path}:pair", "--tokenizer", tokenizer_dir, "--seq-len",
                           S, "--out", out, "--overlong", policy) == 0
        info = load_manifest(out)["splits"]["train"]
        examples = list(iter_examples(out, "train"))
        assert all(len(e["ids"]) <= S for e in examples)
        if policy == "truncate":
            assert (info["truncated"], info["dropped"]) == (sum(cut), sum(lost))
            assert sorted(e["ordinal"] for e in examples) == [i for i in range(4) if not lost[i]]
            for e in examples:
                r = records[e["ordinal"]]
                ids = tokenizer(r["prompt"] + r["response"]).input_ids + [tokenizer.eos_token_id]
                assert e["ids"] == ids[:S]                     # the first S tokens, unchanged
                assert any(e["mask"])
        else:
            assert (info["truncated"], info["dropped"]) == (0, sum(cut) + sum(lost))
            assert sorted(e["ordinal"] for e in examples) == [i for i in range(4) if fits[i]]


def test_eval_hold_out_weights_and_sample_counts(tmp_path, sample, tokenizer_dir):
    arc = str(sample["paths"]["arc-e"]["train"])
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"""
seq_len: 128
tokenizer: {tokenizer_dir}
sources:
  - {{task: arc-e, path: {arc}, eval_count: 25, weight: 2}}
  - {{task: arc-c, path: {sample['paths']['arc-c']['train']}, num_samples: 100}}
  - {{task: boolq, path: {sample['paths']['boolq']['train']}, num_samples: 500,
      eval_path: {sample['paths']['boolq']['eval']}}}
""")
    assert run_prepare("--mixture", mixture, "--out", tmp_path / "out") == 0
    train = Counter((e["task"], e["ordinal"]) for e in iter_examples(tmp_path / "out", "train"))
    evals = Counter((e["task"], e["ordinal"]) for e in iter_examples(tmp_path / "out", "eval"))
    arc_train = {o for t, o in train if t == "arc-e"}
    arc_eval = {o for t, o in evals if t == "arc-e"}
    assert len(arc_eval) == 25 and not arc_train & arc_eval and len(arc_train | arc_eval) == 240
    assert all(train[("arc-e", o)] == 2 for o in arc_train)            # weight 2: twice each
    arc_c = [n for (t, _), n in train.items() if t == "arc-c"]
    assert len(arc_c) == 100 and set(arc_c) == {1}                      # exactly 100 distinct
    boolq = Counter(n for (t, _), n in train.items() if t == "boolq")
    assert boolq == {2: 240 - 20, 3: 20}                                 # 500 = 2 * 240 + 20
    assert sum(n for (t, _), n in evals.items() if t == "boolq") == 60  # its own eval file
    m = load_manifest(tmp_path / "out")
    assert m["splits"]["train"]["tasks"]["boolq"]["examples"] == 500
    assert m["splits"]["eval"]["tasks"]["arc-e"]["examples"] == 25


def test_instruction_formats_and_parquet(tmp_path, sample, tokenizer_dir, tokenizer):
    chat = [{"messages": [{"role": "user", "content": "What does a cow say?"},
                          {"role": "assistant", "content": "A cow says moo."},
                          {"role": "user", "content": "And a dog?"},
                          {"role": "assistant", "content": "A dog says woof."}]},
            {"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": "Is ice hot?"},
                          {"role": "assistant", "content": "No, ice is cold."}]}]
    pairs = [{"prompt": "Opposite of hot:", "response": " cold"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    arc_records = read_records(sample["paths"]["arc-e"]["train"])
    pq.write_table(pa.Table.from_pylist(arc_records), tmp_path / "arc.parquet", row_group_size=64)
    out = tmp_path / "out"
    assert run_prepare("--input", f"{tmp_path / 'chat.jsonl'}", "--input",
                       f"{tmp_path / 'pairs.jsonl'}:pair", "--input",
                       f"{tmp_path / 'arc.parquet'}:arc-e", "--tokenizer", tokenizer_dir,
                       "--seq-len", 128, "--out", out) == 0
    eos = tokenizer.eos_token_id
    by_source = {}
    for ex in iter_examples(out, "train"):
        by_source.setdefault(Path(ex["source"]["source"]).name, []).append(ex)
    for ex in by_source["chat.jsonl"]:
        segments = instruction_segments(chat[ex["ordinal"]])
        ids, mask = ex["ids"], ex["mask"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(t for t, _ in segments)
        # Trained runs of tokens = the assistant turns (the last one followed by EOS).
        runs, cur = [], []
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        runs.append(cur)
        assert runs[-1][-1] == eos
        runs[-1] = runs[-1][:-1]
        assert [tokenizer.decode(r).strip() for r in runs] == \
            [t for t, trained in segments if trained]
    (pair,) = by_source["pairs.jsonl"]
    assert tokenizer.decode([t for t, m in zip(pair["ids"], pair["mask"]) if m][:-1]) == "cold"
    # Parquet rows give the same examples as the JSON Lines file they came from.
    assert len(by_source["arc.parquet"]) == 240
    ref = {e["ordinal"]: e for e in iter_examples(_jsonl_arc(tmp_path, sample, tokenizer_dir),
                                                  "train")}
    for ex in by_source["arc.parquet"]:
        assert ex["ids"] == ref[ex["ordinal"]]["ids"] and ex["mask"] == ref[ex["ordinal"]]["mask"]


def _jsonl_arc(tmp_path: Path, sample, tokenizer_dir: Path) -> Path:
    out = tmp_path / "arc_jsonl"
    assert run_prepare("--input", f"{sample['paths']['arc-e']['train']}:arc-e", "--tokenizer",
                       tokenizer_dir, "--seq-len", 128, "--out", out) == 0
    return out


@pytest.mark.parametrize("template", ["alpaca", "moe_peft"])
def test_instruction_template_choice(tmp_path, sample, tokenizer_dir, tokenizer, template):
    out = tmp_path / template
    assert run_prepare("--input", f"{sample['paths']['alpaca']['train']}:alpaca", "--tokenizer",
                       tokenizer_dir, "--seq-len", 256, "--out", out, "--instruction-template",
                       template) == 0
    ex = next(iter_examples(out, "train"))
    rec = read_records(sample["paths"]["alpaca"]["train"])[ex["ordinal"]]
    text = "".join(t for t, _ in instruction_segments(rec, template=template))
    assert tokenizer.decode(ex["ids"], skip_special_tokens=True) == text
    assert load_manifest(out)["instruction_template"] == template


def test_cli_eval_fraction_spares_tasks_with_their_own_eval_file(tmp_path, sample,
                                                                  tokenizer_dir):
    p = sample["paths"]
    out = tmp_path / "out"
    assert run_prepare("--input", f"{p['arc-e']['train']}:arc-e", "--input",
                       f"{p['boolq']['train']}:boolq", "--eval-input",
                       f"{p['boolq']['eval']}:boolq", "--eval-fraction", 0.1, "--tokenizer",
                       tokenizer_dir, "--seq-len", 128, "--out", out) == 0
    m = load_manifest(out)
    assert m["splits"]["eval"]["tasks"]["arc-e"]["examples"] == 24     # held out of train
    assert m["splits"]["train"]["tasks"]["arc-e"]["examples"] == 216
    assert m["splits"]["eval"]["tasks"]["boolq"]["examples"] == 60     # its own file
    assert m["splits"]["train"]["tasks"]["boolq"]["examples"] == 240
    assert m["inputs"][0]["eval_fraction"] == 0.1 and "eval_fraction" not in m["inputs"][1]


def test_blank_lines_and_indented_records(tmp_path, tokenizer_dir, capsys):
    """Blank lines are skipped; record ordinals count records, error lines count lines."""
    good = {"question": "is ice cold", "answer": True}
    lines = [json.dumps(good), "", "   \t", "  " + json.dumps({**good, "answer": False}),
             json.dumps(good)]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out"
    assert run_prepare("--input", f"{path}:boolq", "--tokenizer", tokenizer_dir, "--seq-len", 128,
                       "--out", out) == 0
    m = load_manifest(out)
    assert m["inputs"][0]["records"] == 3
    assert sorted(e["ordinal"] for e in iter_examples(out, "train")) == [0, 1, 2]
    path.write_text("\n".join(lines + ["", '{"question": "q"}']) + "\n")
    assert run_prepare("--input", f"{path}:boolq", "--tokenizer", tokenizer_dir, "--seq-len", 128,
                       "--out", tmp_path / "out2") == 2
    assert f"{path}:7: missing field 'answer'" in capsys.readouterr().err


def test_a_source_whose_every_example_is_dropped(tmp_path, sample, tokenizer_dir):
    """A source with no example that fits (dropped as over-long) is counted, not a crash."""
    out = tmp_path / "out"
    paths = sample["paths"]
    rc = run_prepare("--input", f"{paths['piqa']['train']}:piqa", "--input", f"{paths['boolq']['train']}:boolq",
                     "--tokenizer", tokenizer_dir, "--seq-len", 40, "--overlong", "drop", "--out", out)
    assert rc == 0
    tasks = load_manifest(out)["splits"]["train"]["tasks"]
    assert tasks["piqa"]["examples"] == 0 and tasks["piqa"]["dropped"] > 0
    assert tasks["boolq"]["examples"] > 0
