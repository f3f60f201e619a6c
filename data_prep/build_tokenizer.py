"""Train a small LLaMA-style sentencepiece tokenizer and save a Hugging Face tokenizer directory.

Nothing can be downloaded where tests and demos run, so the project builds its own tokenizer:
sentencepiece BPE with byte fallback, split digits, no normalisation and ids unk=0, bos=1, eos=2
(LLaMA's conventions), converted to a fast tokenizer that ``AutoTokenizer.from_pretrained``
loads (tokenizer.json + tokenizer_config.json; the sentencepiece model is kept beside them).

    python data_prep/build_tokenizer.py --input data/sample --out tokenizer/ --vocab-size 2000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json")


def iter_training_lines(texts_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Lines of text: raw strings as given; files read line by line; JSON / JSON Lines files
    contribute every string value they hold (the text, not the JSON syntax); directories are
    walked in sorted order."""
    for item in texts_or_files:
        path = Path(item) if isinstance(item, os.PathLike) or _looks_like_path(item) else None
        if path is None:
            yield from str(item).split("\n")
        elif path.is_dir():
            yield from iter_training_lines(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.suffix.lower() in _DATA_SUFFIXES:
            yield from _json_strings(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    yield line.rstrip("\n")


def _looks_like_path(item: Any) -> bool:
    return isinstance(item, str) and "\n" not in item and len(item) < 4096 and os.path.exists(item)


def _json_strings(path: Path) -> Iterator[str]:
    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield from value.split("\n")
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, list):
            for v in value:
                yield from walk(v)

    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1).lstrip()
        f.seek(0)
        if head == "[":
            yield from walk(json.load(f))
            return
        for line in f:
            if line.strip():
                try:
                    yield from walk(json.loads(line))
                except json.JSONDecodeError:
                    yield line.rstrip("\n")


def build_tokenizer(texts_or_files: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                    vocab_size: int, *, max_sentences: int = 2_000_000,
                    num_threads: int | None = None) -> Path:
    """Train a sentencepiece BPE tokenizer on the given texts/files and save it to ``out_dir``
    (replaced atomically). Returns the directory."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 (256 byte pieces + specials), got "
                         f"{vocab_size}")
    lines = [line for line in iter_training_lines(texts_or_files) if line.strip()]
    if not lines:
        raise ValueError("no training text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.99995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        # LLaMA has no pad token; unk (never produced with byte fallback) stands in, as in the
        # reference's fallback.
        tok = LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=True, add_eos_token=False,
                                             pad_token="<unk>", legacy=False)
        tok.save_pretrained(str(tmp))
        check = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
        probe = next((line for line in lines if line == line.lstrip()), lines[0].lstrip())
        if check.decode(check(probe).input_ids, skip_special_tokens=True) != probe:
            raise RuntimeError(f"built tokenizer does not round-trip {probe!r}")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if len(check) < vocab_size:
        warnings.warn(VocabularyShortfall(
            f"{out}: requested a vocabulary of {vocab_size} tokens, got {len(check)}: the training "
            f"text has fewer distinct pieces to merge (sentencepiece stops early rather than fail); "
            f"give more or more varied text for a larger vocabulary, or ask for {len(check)}"))
    return out


class VocabularyShortfall(UserWarning):
    """The built tokenizer has fewer tokens than requested."""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True,
                   help="text / JSON / JSON Lines file or directory (repeatable)")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="lines sampled for training (sentencepiece input_sentence_size)")
    args = p.parse_args(argv)
    missing = [i for i in args.input if not os.path.exists(i)]
    if missing:
        print(f"error: input not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VocabularyShortfall)
        out = build_tokenizer(args.input, args.out, args.vocab_size, max_sentences=args.max_sentences)
    for w in caught:
        if issubclass(w.category, VocabularyShortfall):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
