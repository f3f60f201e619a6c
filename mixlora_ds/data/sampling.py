"""Deterministic per-record sampling decisions (held-out eval records, mixture weights, counts).

Each decision is a pure function of (seed, source key, stream, record ordinal), computed with the
splitmix64 finaliser, so worker processes decide for their own records without coordination and
the result does not depend on how records were split into chunks or processes. splitmix64 is a
bijection of uint64, so distinct ordinals never tie: "the m records with the smallest hash" is an
exact sample of size m.
"""

from __future__ import annotations

import hashlib

import numpy as np

STREAM_EVAL = 1    # which records are held out for evaluation
STREAM_WEIGHT = 2  # which records get an extra copy (fractional weights, exact sample counts)

_U64 = np.uint64


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True)
        z += _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def stream_key(seed: int, source_key: str, stream: int) -> int:
    """A 64-bit key for one (seed, source, stream); source_key is e.g. a file's sha256."""
    digest = hashlib.sha256(f"{seed}\0{source_key}\0{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def record_hashes(key: int, ordinals: np.ndarray) -> np.ndarray:
    """uint64 hash per record ordinal for one stream key."""
    with np.errstate(over="ignore"):
        return splitmix64(ordinals.astype(np.uint64) ^ _U64(key))


def smallest_threshold(hashes: np.ndarray, count: int) -> int:
    """The threshold t such that exactly ``count`` of the (distinct) hashes are < t."""
    n = hashes.shape[0]
    if count <= 0:
        return 0
    if count >= n:
        return 2**64  # every record (Python int: larger than any uint64)
    kth = np.partition(hashes, count)[count]
    return int(kth)


def below(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Boolean mask hashes < threshold, with threshold possibly 2**64 (meaning all)."""
    if threshold >= 2**64:
        return np.ones(hashes.shape, dtype=bool)
    return hashes < _U64(threshold)


def fraction_threshold(fraction: float) -> int:
    """Threshold selecting each record independently with probability ``fraction``."""
    return min(2**64, int(fraction * 2.0**64))
