"""``model.compile`` and ``model.cuda_graphs``: every decoder layer's forward through torch.compile,
optionally replayed as CUDA graphs (Inductor's CUDA-graph trees, ``mode="reduce-overhead"``).

A compiled step of a small micro-batch is bound by the host launching kernels, not by the GPU running
them (BENCHMARKS.md, "The compiled step is host-bound"); a CUDA graph launches a layer's whole
forward, or backward, at once. Replays write their outputs into the same memory every time, which
asks two things of the training loop: ``begin_step`` before each micro-batch's forward, and gradients
that do not live in that memory (``copy_gradients_out``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def compile_layers(layers: list[nn.Module], cuda_graphs: bool = False) -> None:
    """torch.compile each layer's forward; identical layers share one compiled graph. The forward
    only: module hooks (the sharded base's gathers) stay outside the graph."""
    mode = "reduce-overhead" if cuda_graphs else None
    for layer in layers:
        layer.forward = torch.compile(layer.forward, mode=mode)


def copy_gradients_out(params: list[nn.Parameter]) -> None:
    """Hand autograd a copy of each gradient a graphed backward produces. Autograd keeps a fresh
    gradient tensor as ``.grad`` itself; one in the graphs' memory would be overwritten by the next
    micro-batch's replay, so accumulated gradients would silently be the last micro-batch's."""
    for p in params:
        p.register_hook(torch.clone)


def begin_step() -> None:
    """Mark the start of a micro-batch: outputs of earlier replays may be overwritten from here on."""
    torch.compiler.cudagraph_mark_step_begin()
