"""ZeRO-3 for a frozen base: shard its weights per decoder layer and gather each layer around its use.

A frozen base needs no gradient reduction and no optimizer state, so what ZeRO-3 has to do for it
is small: keep 1/N of every frozen weight, gather a layer's weights before the layer runs (in
forward, and again in backward, where the input gradient needs them) and free them afterwards.
This module does exactly that, with one flat gather per decoder layer (``FlatShard``: an all-gather,
or on one host's GPUs copy-engine copies out of the other ranks' shards), started
``prefetch_layers`` layers ahead so it travels while earlier layers compute. Its hooks sit on the
decoder layers, never inside them, so a layer's forward can be compiled. (DeepSpeed's stage-3 engine
gathers from hooks on every module, which keeps the layers eager; BENCHMARKS.md compares the two.)
The trainable adapter is untouched: DeepSpeed's ZeRO-1/2 handles it.

Units: one per decoder layer (every frozen parameter inside it, wherever nested), plus the "outer"
unit of the frozen parameters outside the layers (embeddings, final norm, LM head), gathered when the
model's forward starts and kept through backward and on to the next forward.

Order of events, L layers, one training micro-batch::

    forward:   outer gathered, layers 0..p-1 started; layer i: wait for i, start i+p, compute,
               free i (but L-1, which backward needs first)
    backward:  outer gathered (again, if an evaluation forward freed it meanwhile);
               layer i: free i+1 (unless i+1 < p), wait for i, start i-p, compute gradients
               end of backward: layers 0..p-1 and the outer unit stay gathered for the next
               forward (its first needs, which it would otherwise gather while the GPU waits)

(p = ``prefetch_layers``; 0 gathers each layer when it is reached.) At most p + 1 layers are
gathered at a time. Without autograd (evaluation) every layer is freed after its forward, and
everything at the end; ``reshard_all`` frees everything at any time.

Layers run one after another: layer i+1's backward is over once the gradient of layer i's output
(its input) is complete, which is when layer i's backward starts, so that is where i+1 is freed.
(Nodes of layer i+1 that feed only a loss read inside the layer, such as MixLoRA's router loss,
are not on that path; they run earlier all the same, since the autograd engine runs the most
recently created nodes first, and a later layer's nodes are newer.)
Every rank must run the same layers in the same order (true of data parallelism): NCCL gathers are
collectives. Activation checkpointing re-runs a layer's forward inside its backward; while a
backward runs, the forward hooks only make sure the layer is gathered, and free nothing.

The hooks run once per layer in forward and in backward, on the host's critical path where the
step is host-bound (BENCHMARKS.md says where it is): they do as little as they can.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.distributed as tdist
import torch.nn as nn

from mixlora_ds.model.partitioned import gathered
from mixlora_ds.parallel.flat_shard import FlatShard


class Unit:
    """The flat shards (one per dtype and device) of one decoder layer or of the outer parameters."""

    def __init__(self, name: str, shards: list[FlatShard]):
        self.name = name
        self.shards = shards

    def unshard(self) -> None:
        for s in self.shards:
            s.unshard()

    def wait(self) -> None:
        for s in self.shards:
            s.wait()

    def gather_now(self) -> None:
        self.unshard()
        self.wait()

    def reshard(self) -> None:
        for s in self.shards:
            s.reshard()


class ShardedFrozenBase:
    """The frozen weights of ``model`` sharded per decoder layer across ``group``, with the hooks
    that gather them around their use. Build it with :func:`shard_frozen_base`."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], layer_units: list[Unit],
                 outer: Unit | None, outer_modules: list[nn.Module], transport: str, prefetch_layers: int):
        self.layers = list(layers)
        self.units = layer_units
        self.outer = outer
        self.prefetch_layers = prefetch_layers
        """How many layers ahead gathers start (0: each layer waits for its own gather)."""
        self.in_backward = False
        self.transport = transport
        """How units are gathered ("nccl" or "copy_engine", ``FlatShard``), for logs."""
        self._handles = []
        self._handles.append(model.register_forward_pre_hook(self._model_pre_forward))
        self._handles.append(model.register_forward_hook(self._model_post_forward))
        for module in outer_modules:  # whoever calls a submodule directly still finds its weights
            self._handles.append(module.register_forward_pre_hook(self._outer_pre_forward))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_forward(i)))
            self._handles.append(layer.register_forward_hook(self._layer_post_forward(i)))

    # -------------------------------------------------------------------------- forward hooks
    def _model_pre_forward(self, module, args) -> None:
        if self.in_backward:  # a backward that raised never reached its end-of-backward callback
            self._after_backward()
        self._outer_pre_forward(module, args)
        self._start(range(0, self.prefetch_layers))  # travel while the embeddings run

    def _outer_pre_forward(self, module, args) -> None:
        if self.outer is not None:
            self.outer.gather_now()

    def _model_post_forward(self, module, args, output):
        if not torch.is_grad_enabled():
            self.reshard_all()
            return None
        # The LM head and final norm need the outer unit in backward: gather it when backward starts
        # (a no-op when nothing freed it since this forward).
        return _map_tensors(output, lambda t: _CallInBackward.apply(t, self._before_outer_backward))

    def _layer_pre_forward(self, i: int):
        def hook(module, args):
            self.units[i].gather_now()
            if not self.in_backward:  # activation checkpointing re-runs the forward inside backward
                self._start(range(i + 1, i + 1 + self.prefetch_layers))
        return hook

    def _layer_post_forward(self, i: int):
        def hook(module, args, output):
            if self.in_backward:
                return None
            if not torch.is_grad_enabled():
                self.units[i].reshard()
                return None
            if i + 1 < len(self.units):  # the last layer is the first one backward needs: keep it
                self.units[i].reshard()
            # Gather this layer again when backward reaches its output.
            before = functools.partial(self._before_layer_backward, i)
            return _map_tensors(output, lambda t: _CallInBackward.apply(t, before))
        return hook

    # ------------------------------------------------------------------------- backward steps
    def _enter_backward(self) -> None:
        if not self.in_backward:
            self.in_backward = True
            # Runs once this backward pass is over, whatever path it took.
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _before_outer_backward(self) -> None:
        self._enter_backward()
        if self.outer is not None:
            self.outer.gather_now()

    def _before_layer_backward(self, i: int) -> None:
        self._enter_backward()
        # Layer i+1's backward produced this layer's output gradient: it is done (kept if the next
        # forward's prefetch would only gather it again).
        if self.prefetch_layers <= i + 1 < len(self.units):
            self.units[i + 1].reshard()
        self.units[i].gather_now()
        self._start(range(i - 1, i - 1 - self.prefetch_layers, -1))

    def _after_backward(self) -> None:
        for unit in self.units[self.prefetch_layers:]:
            unit.reshard()
        self._start(range(0, self.prefetch_layers))  # (gathered already, unless backward stopped early)
        self.in_backward = False

    # ------------------------------------------------------------------------------- helpers
    def _start(self, indices: range) -> None:
        """Start gathering these layers, in this order (every rank issues the same), skipping
        indices past either end and layers already gathered or on their way."""
        for j in indices:
            if 0 <= j < len(self.units):
                self.units[j].unshard()

    def reshard_all(self) -> None:
        for unit in self.units:
            unit.reshard()
        if self.outer is not None:
            self.outer.reshard()

    def all_shards(self) -> list[FlatShard]:
        units = self.units + ([self.outer] if self.outer is not None else [])
        return [s for u in units for s in u.shards]

    def held_numel(self) -> tuple[int, int]:
        """(elements of this rank's shards, elements of the whole frozen base). Between steps a rank
        also keeps the outer unit and the first ``prefetch_layers`` layers gathered."""
        shards = self.all_shards()
        return sum(s.held_numel for s in shards), sum(s.numel for s in shards)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _CallInBackward(torch.autograd.Function):
    """Identity on a tensor; its backward first calls ``fn()``: on a layer's output, once that
    gradient is complete, which is when backward reaches the layer."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, fn) -> torch.Tensor:
        ctx.fn = fn
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.fn()
        return grad, None


def _map_tensors(obj: Any, fn) -> Any:
    """``fn`` applied to every floating-point tensor that requires grad in nested tuples, lists and
    mappings (a layer's outputs, a model's output object); everything else is returned as
    it is, containers rebuilt as their own type."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.requires_grad and obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuples
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):  # Transformers' ModelOutput is a dict built from keyword fields
        return type(obj)(**{k: _map_tensors(v, fn) for k, v in obj.items()})
    return obj


# ---------------------------------------------------------------------------------- building
def frozen_params(module: nn.Module, exclude: set[int] = frozenset()) -> list[nn.Parameter]:
    """Frozen parameters of ``module`` in registration order, each once (tied weights share one)."""
    seen, out = set(exclude), []
    for p in module.parameters():
        if not p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _shard_unit(name: str, params: list[nn.Parameter], group, dtype: torch.dtype | None, transport: str) -> Unit:
    """Copy our slices of ``params`` (gathering ZeRO-3-partitioned ones), then own the parameters."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = defaultdict(list)
    for p in params:
        by_kind[(dtype or p.dtype, p.device)].append(p)
    with gathered(params):
        shards = [FlatShard(f"{name}[{kind_dtype}]", ps, group, kind_dtype, transport)
                  for (kind_dtype, _), ps in by_kind.items()]
    for p in params:
        _forget_zero3(p)
    for s in shards:
        s.take_over()
    return Unit(name, shards)


def _forget_zero3(p: nn.Parameter) -> None:
    """Drop what ``deepspeed.zero.Init`` attached to a parameter (its partition included), so
    DeepSpeed and its gatherer (``gatherers.py``) treat it as an ordinary tensor from now on."""
    zero_init_attrs = {"all_gather", "all_gather_coalesced", "partition", "reduce_gradients_at_owner",
                       "partition_gradients", "aligned_size", "padding_size", "partition_numel", "item",
                       "convert_to_zero_parameters", "is_external_param", "nvme_swapper"}
    for key in [k for k in vars(p) if k.startswith("ds_") or k in zero_init_attrs]:
        delattr(p, key)


def shard_frozen_base(model: nn.Module, layers: Sequence[nn.Module], group: tdist.ProcessGroup | None = None,
                      dtype: torch.dtype | None = None,
                      transport: Literal["nccl", "copy_engine"] = "nccl",
                      prefetch_layers: int = 1) -> ShardedFrozenBase:
    """Shard every frozen parameter of ``model`` per decoder layer across ``group`` and install the
    hooks that gather them. Collective. The parameters may be whole (any model) or partitioned by
    ``deepspeed.zero.Init`` (one layer at a time is gathered to re-shard it, so no rank ever holds
    the whole model); trainable parameters are left alone. ``dtype``: cast the frozen weights to it
    (what a bf16 DeepSpeed engine would do to any other dtype); None keeps each one's own.
    ``transport``: how layers are gathered (``FlatShard``)."""
    layer_units, inside = [], set()
    for i, layer in enumerate(layers):
        params = frozen_params(layer)
        shared = [p for p in params if id(p) in inside]
        if shared:
            raise ValueError(f"decoder layer {i} shares a frozen parameter of shape {tuple(shared[0].shape)} "
                             f"with an earlier layer; sharding per layer needs each layer to own its weights")
        inside.update(id(p) for p in params)
        layer_units.append(_shard_unit(f"layer {i}", params, group, dtype, transport) if params
                           else Unit(f"layer {i}", []))
    outer_params = frozen_params(model, exclude=inside)
    outer = _shard_unit("outer", outer_params, group, dtype, transport) if outer_params else None
    owned = {id(p) for p in outer_params}
    outer_modules = [m for m in model.modules()
                     if any(id(p) in owned for p in m.parameters(recurse=False))]
    return ShardedFrozenBase(model, layers, layer_units, outer, outer_modules, transport, prefetch_layers)


@contextlib.contextmanager
def hidden_from_engine_broadcast(sharded: ShardedFrozenBase | None) -> Iterator[None]:
    """Inside this block DeepSpeed's engine start-up does not broadcast the sharded weights.

    A stage 0-2 engine assumes a replicated model and broadcasts every parameter from rank 0 when it
    starts; it skips parameters whose ``ds_status`` says they are not available, which is what a
    freed shard is. The flag is removed again afterwards. (The engine also casts parameters of
    another dtype than its own; ``shard_frozen_base(dtype=...)`` leaves none.)
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for s in sharded.all_shards() for p in s.params] if sharded is not None else []
    for p in params:
        p.ds_status = ZeroParamStatus.NOT_AVAILABLE
    try:
        yield
    finally:
        for p in params:
            del p.ds_status
