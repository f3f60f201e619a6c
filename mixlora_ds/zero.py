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
    Parameters that are already gathered (inside a ZeRO-3 leaf module's forward, say) are used as
    they are: gathering them again would free them on exit while their module still needs them.
    """
    params = [p for p in params if p is not None and is_partitioned(p)]
    if params:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        params = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield
