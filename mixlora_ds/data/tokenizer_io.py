"""Finding and loading a local Hugging Face tokenizer directory, its padding id, and its fingerprint.

Prepared data is only valid with the tokenizer that produced it, so the manifest stores a
fingerprint: a hash of the tokenizer's files plus a hash of the ids it gives for a fixed probe
text (which also catches behaviour that lives outside the files, e.g. a library upgrade).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mixlora_ds.data.errors import DataError

# Files that define tokenization (a tokenizer directory is often a whole model directory:
# weights are deliberately not hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")

# Any of these marks a directory as holding a tokenizer.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# Special tokens that stand in for padding, in the reference's order.
_PAD_FALLBACK = ("pad", "unk", "eos")

PROBE_TEXT = ("Please choose the correct answer to the question: Which is warmer? (A) ice (B) fire"
              "\nAnswer: B  ### Response:\n tabs\tand\nnewlines, digits 0123456789, café, 日本.")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """AutoTokenizer.from_pretrained on a local directory, with a DataError naming the directory
    and the reason when it cannot be loaded (nothing is ever fetched from the network)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: tokenizer directory does not exist", reason="bad_tokenizer",
                        field="tokenizer")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{p}: tokenizer directory could not be loaded: {type(e).__name__}: "
                        f"{msg}", reason="bad_tokenizer", field="tokenizer") from None
    if isinstance(tok, bool) or not hasattr(tok, "encode"):
        raise DataError(f"{p}: tokenizer directory did not load a tokenizer",
                        reason="bad_tokenizer", field="tokenizer")
    return tok


def find_tokenizer_dir(*candidates: str | os.PathLike | None) -> Path | None:
    """The first candidate directory that holds a tokenizer."""
    for c in candidates:
        if c is not None and any((Path(c) / n).is_file() for n in _TOKENIZER_MARKERS):
            return Path(c)
    return None


def pad_id_of(tok: Any) -> int:
    """Padding id: pad, else unk, else eos (the reference's order), else 0. Padding is never
    attended by real tokens nor trained, so any valid id works."""
    for name in _PAD_FALLBACK:
        value = getattr(tok, f"{name}_token_id", None)
        if value is not None:
            return int(value)
    return 0


def ensure_pad_token(tok: Any) -> Any:
    """Give ``tok`` a pad token when it has none: the one ``pad_id_of`` pads with (unk, else eos), so
    code that pads through the tokenizer itself pads as this package does. Returns ``tok``."""
    if tok.pad_token_id is None:
        for name in _PAD_FALLBACK[1:]:
            token = getattr(tok, f"{name}_token", None)
            if token is not None:
                tok.pad_token = token
                break
    return tok


def tokenizer_fingerprint(tok: Any, path: str | os.PathLike) -> dict[str, Any]:
    files = hashlib.sha256()
    names = []
    for name in TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            names.append(name)
            files.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    ids = tok.encode(PROBE_TEXT)
    probe = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    return {
        "path": str(path),
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_id": pad_id_of(tok),
        "files": names,
        "files_sha256": files.hexdigest(),
        "probe_sha256": probe,
        "fingerprint": hashlib.sha256((files.hexdigest() + probe).encode()).hexdigest(),
    }
