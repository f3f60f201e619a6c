"""The one place that knows the frozen base may be partitioned: gather parameters when their values
are needed.

Two partitioners exist: DeepSpeed's stage-3 engine (``deepspeed.zero.Init`` parameters, marked by
``ds_id``) and mixlora_ds's own per-layer sharding of the frozen base (``mixlora_ds.parallel``,
parameters marked by the flat shard that owns them).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from mixlora_ds.parallel.flat_shard import SHARD_ATTR


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, SHARD_ATTR)


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Make partitioned ``params`` whole inside the block (a no-op for ordinary tensors).

    Must be entered on every rank when any parameter is partitioned (it is a collective).
    Parameters that are already gathered (inside a ZeRO-3 leaf module's forward, or a sharded
    layer's, say) are used as they are: gathering them again would free them on exit while their
    module still needs them. Writes (``modifier_rank``) reach DeepSpeed-partitioned parameters only;
    the sharded frozen base is read-only.
    """
    params = [p for p in params if p is not None]
    if modifier_rank is not None and any(hasattr(p, SHARD_ATTR) for p in params):
        raise ValueError("the sharded frozen base is read-only: gathered(..., modifier_rank=...) cannot write it")
    shards = {id(s): s for p in params if (s := getattr(p, SHARD_ATTR, None)) is not None and not s.gathered}
    ds_params = [p for p in params if hasattr(p, "ds_id")]
    if ds_params:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        ds_params = [p for p in ds_params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    for s in shards.values():
        s.unshard()
    for s in shards.values():
        s.wait()
    try:
        if ds_params:
            import deepspeed

            with deepspeed.zero.GatheredParameters(ds_params, modifier_rank=modifier_rank):
                yield
        else:
            yield
    finally:
        for s in shards.values():
            s.reshard()
