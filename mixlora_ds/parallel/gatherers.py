"""mixlora_ds's per-layer sharding of the frozen base (``frozen_base.py``) as a
``model.partitioned.Gatherer``, registered on import: parameters marked by the flat shard that owns
them; read-only, since the frozen base never changes. (DeepSpeed's stage 3 is known to
``model.partitioned`` itself.)
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


register_gatherer(FlatShardGatherer())
