"""The two partitions a model may carry here, as ``model.partitioned.Gatherer``s, registered on import.

- DeepSpeed's stage 3: parameters made by ``deepspeed.zero.Init``, marked by ``ds_id``; writable
  (``modifier_rank``) through ``deepspeed.zero.GatheredParameters``.
- mixlora_ds's per-layer sharding of the frozen base (``frozen_base.py``): parameters marked by the
  flat shard that owns them; read-only, since the frozen base never changes.

Flat shards are made whole first, DeepSpeed's parameters inside, as one ``gathered`` block enters
its gatherers in the order they were registered.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from mixlora_ds.model.partitioned import register_gatherer
from mixlora_ds.parallel.flat_shard import SHARD_ATTR


class FlatShardGatherer:
    """The sharded frozen base: each flat shard that holds one of the parameters is gathered once."""

    def owns(self, p: torch.Tensor) -> bool:
        return hasattr(p, SHARD_ATTR)

    @contextlib.contextmanager
    def gathered(self, params: list[torch.Tensor], modifier_rank: int | None) -> Iterator[None]:
        if modifier_rank is not None:
            raise ValueError("the sharded frozen base is read-only: gathered(..., modifier_rank=...) cannot write it")
        # A shard that is whole already (inside its layer's forward) stays as it is: gathering it
        # again would free it on exit while its layer still needs it.
        shards = {id(s): s for p in params if not (s := getattr(p, SHARD_ATTR)).gathered}
        for s in shards.values():
            s.unshard()
        for s in shards.values():
            s.wait()
        try:
            yield
        finally:
            for s in shards.values():
                s.reshard()


class DeepSpeedGatherer:
    """DeepSpeed's stage-3 parameters that are not available right now (the others are used as they are)."""

    def owns(self, p: torch.Tensor) -> bool:
        return hasattr(p, "ds_id")

    @contextlib.contextmanager
    def gathered(self, params: list[torch.Tensor], modifier_rank: int | None) -> Iterator[None]:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        missing = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if not missing:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(missing, modifier_rank=modifier_rank):
            yield


register_gatherer(FlatShardGatherer())
register_gatherer(DeepSpeedGatherer())
