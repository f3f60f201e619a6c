"""Check, before training, that the prepared data fits the model: same tokenizer, ids in range.

Token ids only mean something under the tokenizer that produced them. Two tokenizers with the
same vocabulary size (Llama-2 and Mistral: 32,000 each) give different ids for the same text, and
training on them runs without error while learning nothing useful; an id past the embedding
table fails only deep inside the first forward. Both are checked here, from files alone, so every
rank reaches the same verdict before any communication.

The comparison uses the fingerprint prepare records in the manifest
(``mixlora_ds.data.tokenizer_io.tokenizer_fingerprint``), computed the same way for the model's
tokenizer: the ids of a fixed probe text, the vocabulary size and the special ids. (Its file hash
is shown but not compared: saving the same tokenizer again rewrites its files.)
"""

from __future__ import annotations

import logging
from typing import Any

from mixlora_ds.train.config import TrainConfig, TrainConfigError

logger = logging.getLogger(__name__)

# Fingerprint fields that decide whether two tokenizers give the same ids.
_BEHAVIOUR = ("probe_sha256", "vocab_size", "bos_token_id", "eos_token_id")
ALLOW_KEY = "data.allow_tokenizer_mismatch"


def model_tokenizer_dir(cfg: TrainConfig) -> tuple[str, str] | None:
    """(directory, config key) of the model's tokenizer: ``model.tokenizer``, else a tokenizer
    saved in ``model.name_or_path``; None when the model has none (random weights from a config)."""
    from mixlora_ds.data.tokenizer_io import find_tokenizer_dir

    if cfg.model.tokenizer:
        return cfg.model.tokenizer, "model.tokenizer"
    if cfg.model.name_or_path and find_tokenizer_dir(cfg.model.name_or_path) is not None:
        return cfg.model.name_or_path, "model.name_or_path"
    return None


def model_tokenizer_fingerprint(cfg: TrainConfig) -> dict[str, Any] | None:
    found = model_tokenizer_dir(cfg)
    if found is None:
        return None
    path, key = found
    from mixlora_ds.data.errors import DataError
    from mixlora_ds.data.tokenizer_io import load_tokenizer, tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(load_tokenizer(path), path)
    except DataError as e:
        raise cfg.error(key, f"{key}: {e}") from None


def describe(fp: dict[str, Any]) -> str:
    return (f"{fp.get('path')} ({fp.get('class')}, {fp.get('vocab_size')} tokens, fingerprint "
            f"{str(fp.get('fingerprint'))[:12]}, probe ids {str(fp.get('probe_sha256'))[:12]})")


def same_tokenization(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in _BEHAVIOUR)


def check_tokenizer(cfg: TrainConfig, key: str, data_dir: str, manifest: dict[str, Any],
                    expected: dict[str, Any] | None, expected_name: str) -> None:
    """Compare the tokenizer ``data_dir`` was prepared with against ``expected`` (fingerprints)."""
    data_fp = manifest.get("tokenizer")
    if expected is None or not isinstance(data_fp, dict) or same_tokenization(data_fp, expected):
        return
    message = (f"{cfg.where(key)}: {key}={data_dir!r} was prepared with tokenizer "
               f"{describe(data_fp)}, but {expected_name} is {describe(expected)}: "
               f"they give different token ids for the same text")
    if cfg.data.allow_tokenizer_mismatch:
        logger.warning("%s; training anyway (%s is true)", message, ALLOW_KEY)
        return
    raise TrainConfigError(
        f"{message}. Prepare the data again with --tokenizer {expected.get('path')}, or use the model "
        f"and tokenizer the data was prepared for; to train on this data on purpose, set {ALLOW_KEY}: true "
        f"(or --{ALLOW_KEY} true)", key=key)


def check_token_ids(cfg: TrainConfig, key: str, data_dir: str, manifest: dict[str, Any], split: str,
                    hf_config: Any) -> None:
    """Every token id of ``split`` must index the model's embedding table (never waivable)."""
    from mixlora_ds.data.shards import max_token_id

    vocab_size = getattr(hf_config, "vocab_size", None)
    if vocab_size is None:
        return
    largest = max_token_id(data_dir, manifest, split)
    if largest is not None and largest >= vocab_size:
        tok = manifest.get("tokenizer", {})
        raise cfg.error(
            key, f"{key}={data_dir!r}, split {split!r}: the largest token id is {largest}, "
            f"but the model's embedding has {vocab_size} rows (vocab_size); the data was prepared with "
            f"tokenizer {tok.get('path')} ({tok.get('vocab_size')} tokens). Use a model whose vocabulary "
            f"covers that tokenizer (vocab_size >= {largest + 1}), or prepare the data with the model's "
            f"tokenizer")


def check_data_fits_model(cfg: TrainConfig, hf_config: Any,
                          datasets: list[tuple[str, str, dict[str, Any], str]]) -> None:
    """Run both checks on each ``(config key, data dir, manifest, split)`` the run reads, the
    training data first."""
    expected = model_tokenizer_fingerprint(cfg)
    if expected is not None:
        name = f"the model's tokenizer ({model_tokenizer_dir(cfg)[1]})"
    else:  # a model without a tokenizer: the held-out data must at least match the training data
        expected, name = datasets[0][2].get("tokenizer"), f"the tokenizer of {datasets[0][0]}"
    for key, data_dir, manifest, split in datasets:
        check_tokenizer(cfg, key, data_dir, manifest, expected, name)
        check_token_ids(cfg, key, data_dir, manifest, split, hf_config)
