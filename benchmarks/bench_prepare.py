"""Throughput and memory of offline data preparation, side by side with two references.

    python benchmarks/bench_prepare.py --work /tmp/bench_prepare --mb 50 --num-proc 2

On one generated corpus (JSON Lines: Alpaca-style instruction records plus five commonsense
tasks in their public schemas, pseudo-words so a 32k vocabulary is really used) it measures
tokens per second of:

  prepare      mixlora-prepare end to end (read, validate, template, tokenize, mask, pack,
               write shards + manifest, fsync, atomic rename), --num-proc N worker processes
  tokenizer    the ceiling: the fast tokenizer alone, batched (tok(list_of_texts)), on the
               already-rendered texts held in memory, with its own thread pool on the same cores
  naive        datasets.Dataset.from_json + a per-example .map(num_proc=N) that renders and
               tokenizes each record, then Python-level padding of every example to seq_len

and the peak resident memory (whole process tree) of prepare at two input sizes (--mb and
--mb-small), which should stay flat as the input grows. Tokens are counted the same way for all
three (BOS + text, no EOS) so the rates compare. Results go to stdout and --json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- corpus
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def _lexicon(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    return sorted(words)


class _Text:
    """Zipf-distributed pseudo-words with punctuation, numbers and capitals."""

    def __init__(self, rng: random.Random, vocab: int = 60000) -> None:
        self.rng = rng
        self.words = _lexicon(rng, vocab)
        weights = 1.0 / np.arange(1, vocab + 1) ** 1.05
        self.cum = np.cumsum(weights / weights.sum())
        self.np_rng = np.random.default_rng(rng.randrange(2**32))

    def words_n(self, n: int) -> list[str]:
        idx = np.searchsorted(self.cum, self.np_rng.random(n))
        return [self.words[min(i, len(self.words) - 1)] for i in idx]

    def sentence(self, lo: int, hi: int) -> str:
        w = self.words_n(self.rng.randint(lo, hi))
        w[0] = w[0].capitalize()
        if self.rng.random() < 0.2:
            w.insert(self.rng.randrange(len(w)), str(self.rng.randrange(10000)))
        return " ".join(w) + self.rng.choice([".", ".", ".", "?", "!"])

    def paragraph(self, sentences: int) -> str:
        return " ".join(self.sentence(4, 18) for _ in range(sentences))


def make_corpus(out: Path, target_mb: float, seed: int = 0) -> list[tuple[Path, str]]:
    """Write the corpus; returns [(path, task)] for --input. ~70% of the bytes are instruction
    records, the rest commonsense records."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text = _Text(rng)
    target = int(target_mb * 1e6)
    files = {"alpaca": out / "alpaca.jsonl", "arc-e": out / "arc-e.jsonl",
             "boolq": out / "boolq.jsonl", "piqa": out / "piqa.jsonl",
             "hellaswag": out / "hellaswag.jsonl", "winogrande": out / "winogrande.jsonl"}
    handles = {k: open(p, "w", encoding="utf-8") for k, p in files.items()}
    written = 0
    i = 0
    try:
        while written < target:
            i += 1
            r = rng.random()
            if r < 0.45:
                task, rec = "alpaca", {"instruction": text.sentence(5, 25),
                                       "input": text.paragraph(rng.randint(0, 4)),
                                       "output": text.paragraph(rng.randint(2, 14))}
            elif r < 0.6:
                labels = list("ABCD")
                task, rec = "arc-e", {"id": str(i), "question": text.sentence(6, 25),
                                      "choices": {"label": labels,
                                                  "text": [text.sentence(1, 6) for _ in labels]},
                                      "answerKey": rng.choice(labels)}
            elif r < 0.7:
                task, rec = "boolq", {"question": text.sentence(5, 14).lower().rstrip(".?!"),
                                      "answer": rng.random() < 0.5,
                                      "passage": text.paragraph(4), "title": text.sentence(1, 3)}
            elif r < 0.8:
                task, rec = "piqa", {"goal": text.sentence(5, 20), "sol1": text.sentence(5, 30),
                                     "sol2": text.sentence(5, 30), "label": rng.randrange(2)}
            elif r < 0.9:
                task, rec = "hellaswag", {"activity_label": text.sentence(1, 3).rstrip(".?!"),
                                          "ctx": text.sentence(8, 30),
                                          "endings": [text.sentence(4, 20) for _ in range(4)],
                                          "label": str(rng.randrange(4))}
            else:
                task, rec = "winogrande", {"sentence": text.sentence(8, 25) + " _ " +
                                           text.sentence(2, 8), "option1": text.words_n(1)[0],
                                           "option2": text.words_n(1)[0],
                                           "answer": rng.choice(["1", "2"])}
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            handles[task].write(line)
            written += len(line.encode())
    finally:
        for h in handles.values():
            h.close()
    return [(p, t) for t, p in files.items()]


def render_texts(inputs: list[tuple[Path, str]]) -> list[str]:
    """The exact training texts prepare tokenizes (prompt + response), in memory."""
    from mixlora_ds.data.templates import TASKS, instruction_segments

    texts = []
    for path, task in inputs:
        spec = TASKS.get(task)
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if spec is not None:
                    texts.append(spec.build_prompt(rec) + spec.completion(rec))
                else:
                    texts.append("".join(t for t, _ in instruction_segments(rec)))
    return texts


# --------------------------------------------------------------------------- measurements
class PeakRSS:
    """Peak summed RSS of a process and its children, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs
                                               if p.is_running()))
            except psutil.Error:
                pass
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_prepare(inputs: list[tuple[Path, str]], tokenizer: Path, out: Path, seq_len: int,
                num_proc: int) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "data_prep" / "prepare.py"), "--tokenizer", str(tokenizer),
           "--seq-len", str(seq_len), "--out", str(out), "--num-proc", str(num_proc),
           "--overwrite", "--no-progress", "--no-eos"]
    for path, task in inputs:
        cmd += ["--input", f"{path}:{task}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meter = PeakRSS(proc.pid)
    output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    peak = meter.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{output}")
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["splits"]["train"]["tokens"]
    # prepare's own clock (from its start to the rename), as printed in its summary line.
    inner = float(output.strip().splitlines()[-1].split(" tokens in ")[1].split(" s ")[0])
    return {"tokens": tokens, "seconds": inner, "wall_seconds_with_startup": wall,
            "tokens_per_s": tokens / inner, "peak_rss_mb": peak / 2**20,
            "packing_efficiency": manifest["splits"]["train"]["packing_efficiency"],
            "rows": manifest["splits"]["train"]["rows"], "log_tail": output.strip()[-400:]}


def run_tokenizer_alone(texts: list[str], tokenizer: Path, batch: int = 1000) -> dict[str, Any]:
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    tok(texts[:batch])  # warm up the thread pool
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch])
        tokens += sum(len(ids) for ids in enc["input_ids"])
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_naive(inputs: list[tuple[Path, str]], tokenizer: Path, seq_len: int,
              num_proc: int, cache_dir: Path) -> dict[str, Any]:
    """The plain way: datasets.map one example at a time, then pad every example."""
    code = f"""
import json, os, sys, time
import numpy as np
os.environ["HF_DATASETS_CACHE"] = {str(cache_dir)!r}
import datasets
datasets.disable_progress_bars()
from transformers import AutoTokenizer
from mixlora_ds.data.templates import TASKS, instruction_segments
tok = AutoTokenizer.from_pretrained({str(tokenizer)!r})
inputs = {[(str(p), t) for p, t in inputs]!r}
t0 = time.perf_counter()
rows, total = [], 0
for path, task in inputs:
    ds = datasets.Dataset.from_json(path, cache_dir={str(cache_dir)!r})
    spec = TASKS.get(task)
    def fn(rec, spec=spec):
        if spec is not None:
            text = spec.build_prompt(rec) + spec.completion(rec)
        else:
            text = "".join(t for t, _ in instruction_segments(rec))
        ids = tok(text)["input_ids"]
        return {{"input_ids": ids, "labels": list(ids)}}
    ds = ds.map(fn, num_proc={num_proc}, remove_columns=ds.column_names)
    for ex in ds:
        ids = ex["input_ids"][:{seq_len}]
        total += len(ids)
        rows.append(ids + [0] * ({seq_len} - len(ids)))
arr = np.asarray(rows, dtype=np.int32)
seconds = time.perf_counter() - t0
print(json.dumps({{"tokens": total, "seconds": seconds, "tokens_per_s": total / seconds,
                  "rows": arr.shape[0]}}))
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    meter = PeakRSS(proc.pid)
    out, err = proc.communicate()
    peak = meter.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"naive baseline failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/bench_prepare", help="scratch directory")
    p.add_argument("--mb", type=float, default=50.0, help="corpus size (MB of JSON Lines)")
    p.add_argument("--mb-small", type=float, default=12.5,
                   help="smaller corpus for the peak-memory comparison")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from data_prep.build_tokenizer import build_tokenizer

    work = Path(args.work)
    big = make_corpus(work / f"corpus_{args.mb:g}mb", args.mb, seed=0)
    small = make_corpus(work / f"corpus_{args.mb_small:g}mb", args.mb_small, seed=1)
    tok_dir = work / f"tokenizer_{args.vocab_size}"
    if not (tok_dir / "tokenizer.json").exists():
        t0 = time.perf_counter()
        build_tokenizer([str(path) for path, _ in big], tok_dir, args.vocab_size,
                        max_sentences=300_000)
        print(f"built {args.vocab_size}-vocab tokenizer in {time.perf_counter() - t0:.0f} s")
    corpus_mb = sum(path.stat().st_size for path, _ in big) / 1e6
    load = os.getloadavg()
    results: dict[str, Any] = {"corpus_mb": corpus_mb, "num_proc": args.num_proc,
                               "seq_len": args.seq_len, "cpus": os.cpu_count(),
                               "loadavg_before": load}
    print(f"corpus {corpus_mb:.1f} MB, {os.cpu_count()} CPUs, load average {load}")

    texts = render_texts(big)
    results["tokenizer"] = run_tokenizer_alone(texts, tok_dir)
    del texts
    print(f"tokenizer alone: {results['tokenizer']['tokens_per_s']:,.0f} tokens/s")
    results["prepare"] = run_prepare(big, tok_dir, work / "out_big", args.seq_len, args.num_proc)
    print(f"prepare:         {results['prepare']['tokens_per_s']:,.0f} tokens/s, peak RSS "
          f"{results['prepare']['peak_rss_mb']:.0f} MB")
    results["prepare_small"] = run_prepare(small, tok_dir, work / "out_small", args.seq_len,
                                           args.num_proc)
    print(f"prepare ({args.mb_small:g} MB): peak RSS "
          f"{results['prepare_small']['peak_rss_mb']:.0f} MB")
    if not args.skip_naive:
        results["naive"] = run_naive(big, tok_dir, args.seq_len, args.num_proc,
                                     work / "hf_cache")
        print(f"naive datasets.map + padding: {results['naive']['tokens_per_s']:,.0f} tokens/s, "
              f"peak RSS {results['naive']['peak_rss_mb']:.0f} MB")
    results["loadavg_after"] = os.getloadavg()
    ceiling = results["tokenizer"]["tokens_per_s"]
    rate = results["prepare"]["tokens_per_s"]
    print(f"prepare / tokenizer ceiling = {rate / ceiling:.2f}")
    if "naive" in results:
        print(f"prepare / naive = {rate / results['naive']['tokens_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
