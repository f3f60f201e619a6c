"""Weights that may be partitioned across ranks: the model's one interface to whoever partitions them.

The model maths never gathers. Around every forward, the partitioner makes whole what the forward
reads: mixlora_ds's sharded frozen base gathers each decoder layer around the layer's forward, and
DeepSpeed's stage 3 gathers each module's parameters around its forward (a leaf module's all at
once, and any parameter a forward reads from outside its own module when it is read). Only what
reads weights outside a forward asks for them here: DoRA's initial magnitudes at injection, the
refusal to merge a partitioned model, and, outside the model, adapter export and loading.

A partitioner implements ``Gatherer`` and registers it. DeepSpeed's stage 3 is known here already:
its placeholders reach a model from outside the project (Transformers builds models inside
``deepspeed.zero.Init`` whenever a ZeRO-3 config is active), so the public API must gather them
whether or not the project's parallel code was imported; DeepSpeed itself is imported only when
such a parameter is met. ``mixlora_ds.parallel`` registers the project's own flat shards of the
frozen base when it is imported, which it is before it makes any. With no partition, every tensor
is whole.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Iterator, Protocol

import torch


class Gatherer(Protocol):
    """One way of partitioning weights, and how to make them whole outside a forward."""

    def owns(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is partitioned this way (whether or not it is whole right now)."""

    def gathered(self, params: list[torch.Tensor], modifier_rank: int | None) -> ContextManager[None]:
        """Make ``params`` (all owned) whole inside the block; collective. ``modifier_rank``: the rank
        whose in-place writes are kept, where this kind of partition can take writes."""


_GATHERERS: list[Gatherer] = []


def register_gatherer(gatherer: Gatherer) -> None:
    """Consult ``gatherer`` from now on."""
    if gatherer not in _GATHERERS:
        _GATHERERS.append(gatherer)


def is_partitioned(p: torch.Tensor) -> bool:
    return any(g.owns(p) for g in _GATHERERS)


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor | None], modifier_rank: int | None = None) -> Iterator[None]:
    """Make partitioned ``params`` whole inside the block (a no-op for whole tensors; None is skipped).

    Must be entered on every rank when any parameter is partitioned (it is a collective). Parameters
    that are whole already (inside a forward the partitioner wraps) are used as they are. Writes
    (``modifier_rank``) reach the partitions that can take them; a gatherer refuses the others.
    """
    params = [p for p in params if p is not None]
    with contextlib.ExitStack() as stack:
        for gatherer in _GATHERERS:
            owned = [p for p in params if gatherer.owns(p)]
            if owned:
                stack.enter_context(gatherer.gathered(owned, modifier_rank))
        yield


class DeepSpeedGatherer:
    """DeepSpeed's stage-3 parameters (marked by ``ds_id``), writable through ``modifier_rank``; those
    available already (inside a forward that gathered them) are used as they are."""

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


register_gatherer(DeepSpeedGatherer())
