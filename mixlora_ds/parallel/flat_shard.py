"""Frozen parameters of one unit kept as one flat buffer, of which each rank holds a 1/N slice.

Shapes: N ranks in the group; the unit's parameters, flattened and concatenated in order (each
starting on a 128-byte boundary, as GEMM and compiled kernels like their operands), fill ``full_F``
(F = N * S elements, the tail padded); rank r keeps ``full_F[r*S:(r+1)*S]`` as ``shard_S``.

The parameters stay the ``nn.Parameter`` objects of their modules, each a fixed view into
``full_F``. Between uses the storage of ``full_F`` is freed (resized to zero bytes) and one
gather refills it, so every view of it sees the weights again: the parameters, and whatever
autograd or a compiled graph saved for backward. Frozen weights never change, so nothing is ever
written back.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.distributed as tdist
import torch.nn as nn

from mixlora_ds.parallel import peer_copy

ALIGN_BYTES = 128
# all_gather_into_tensor's new name since torch 2.13; the same call.
_all_gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
SHARD_ATTR = "_mixlora_flat_shard"
"""Set on every parameter a ``FlatShard`` owns, pointing to it (see ``gatherers.FlatShardGatherer``)."""


class FlatShard:
    """Gather (``unshard`` then ``wait``) and free (``reshard``) the frozen weights of one unit.

    ``unshard`` starts the gather and returns at once, so the next unit's weights can travel while
    this one computes; ``wait`` makes the current stream wait for them (no host synchronisation on
    GPUs). With one rank the shard is the whole buffer and all three are no-ops.

    ``transport``: "nccl", an all-gather on the group (any backend, any hosts); "copy_engine", the
    shards in symmetric memory and each rank copying the others' itself (one host's GPUs;
    ``peer_copy``).
    """

    def __init__(self, name: str, params: Sequence[nn.Parameter], group: tdist.ProcessGroup | None = None,
                 dtype: torch.dtype | None = None, transport: Literal["nccl", "copy_engine"] = "nccl"):
        """Copy this rank's slice of ``params`` (one device), whose ``.data`` must hold their full values
        now (``frozen_base.shard_frozen_base`` gathers ZeRO-3-partitioned ones first), in ``dtype``
        (default: theirs, which must then be one); ``take_over`` then makes the parameters views of
        the flat buffer."""
        if not params:
            raise ValueError(f"{name}: a flat shard needs at least one parameter")
        if transport not in ("nccl", "copy_engine"):
            raise ValueError(f"{name}: transport must be 'nccl' or 'copy_engine', got {transport!r}")
        kinds = {p.device for p in params} if dtype is not None else {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ValueError(f"{name}: one dtype and device per flat shard, got {sorted(map(str, kinds))}")
        self.name = name
        self.params = list(params)
        self.group = group
        self.world = tdist.get_world_size(group) if tdist.is_initialized() else 1
        self.rank = tdist.get_rank(group) if tdist.is_initialized() else 0
        self.dtype = dtype or self.params[0].dtype
        self.device = self.params[0].device
        self.shapes = [p.shape for p in self.params]  # now, while the values are whole
        self.numel = sum(p.numel() for p in self.params)
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=self.dtype).element_size())
        self.offsets, end = [], 0
        for shape in self.shapes:
            self.offsets.append(end)
            end = math.ceil((end + shape.numel()) / align) * align
        self.shard_numel = math.ceil(end / self.world / align) * align
        by_copy = transport == "copy_engine" and self.world > 1
        if by_copy:  # in symmetric memory, where the other ranks can map it
            self.shard_S = peer_copy.allocate(self.shard_numel, self.dtype, self.device)
        else:
            self.shard_S = torch.zeros(self.shard_numel, dtype=self.dtype, device=self.device)
        lo, hi = self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel
        for p, offset in zip(self.params, self.offsets):
            a, b = max(lo, offset), min(hi, offset + p.numel())
            if a < b:  # the part of this parameter that falls in our slice
                self.shard_S[a - lo:b - lo].copy_(p.data.reshape(-1)[a - offset:b - offset])
        self.full_F: torch.Tensor | None = None
        self._work = None
        self.gathered = False
        self._peers = None
        self._by_copy: peer_copy.PeerGather | None = None  # built by take_over, once full_F exists
        if by_copy:
            self._peers, self._symm_handle = peer_copy.map_peers(self.shard_S, group)

    def take_over(self) -> None:
        """Point every parameter at its view of the full buffer, which is then freed. Separate from
        construction so that the previous owner of the values (ZeRO-3) can let go of them first."""
        if self.world == 1:
            self.full_F = self.shard_S
        else:  # allocated to be laid out, freed at once: its memory comes back with each gather
            self.full_F = torch.empty(self.shard_numel * self.world, dtype=self.dtype, device=self.device)
        self._full_bytes = self.full_F.untyped_storage().nbytes()
        if self._peers is not None:
            self._by_copy = peer_copy.PeerGather(self.full_F, self._peers, self.rank)
        for p, shape, offset in zip(self.params, self.shapes, self.offsets):
            p.data = self.full_F[offset:offset + shape.numel()].view(shape)
            setattr(p, SHARD_ATTR, self)
        self.gathered = True
        self.reshard()

    # --------------------------------------------------------------------------------- state
    def unshard(self) -> None:
        """Start gathering the full weights. Over NCCL a collective (every rank calls it in the same
        order); by copy engine each rank's own business, on a side stream."""
        if self.gathered or self._work is not None:
            return
        self.full_F.untyped_storage().resize_(self._full_bytes)
        if self._by_copy is not None:
            self._by_copy.start()
            self._work = self._by_copy
        else:
            self._work = _all_gather(self.full_F, self.shard_S, group=self.group, async_op=True)

    def wait(self) -> None:
        """The full weights are usable (on the current stream) once this returns."""
        if self._work is not None:
            self._work.wait()
            self._work = None
            self.gathered = True
        elif not self.gathered:
            raise RuntimeError(f"{self.name}: wait() before unshard()")

    def reshard(self) -> None:
        """Free the full weights; only this rank's slice stays."""
        if self.world == 1:
            return
        if self._work is not None:  # never free memory a gather still writes
            self.wait()
        self.full_F.untyped_storage().resize_(0)
        self.gathered = False

    @property
    def held_numel(self) -> int:
        """Elements of this unit this rank keeps between uses (its slice, padding included)."""
        return self.shard_numel

    @property
    def live_bytes(self) -> int:
        """Bytes the full buffer takes right now (0 while freed; with one rank, always the whole)."""
        return self.full_F.untyped_storage().nbytes() if self.full_F is not None else 0
