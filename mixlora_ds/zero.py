"""The one place that knows ZeRO-3 partitions parameters: gather them when their values are needed."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3-partitioned ``params`` whole inside the block (a no-op for ordinary tensors).

    Must be entered on every rank when any parameter is partitioned (it is a collective).
    """
    params = [p for p in params if p is not None]
    if any(is_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield
