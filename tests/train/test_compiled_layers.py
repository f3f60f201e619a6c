"""``copy_gradients_out`` on CPU: a backward that, as a CUDA-graph replay does, writes its gradient
into the same memory every time. Without the copy autograd keeps that memory as ``.grad`` and the
next backward overwrites what was accumulated; with it, accumulation is exact. (Replays themselves
need a GPU: tests/gpu/test_cuda_graphs_gpu.py.)"""

from __future__ import annotations

import torch

from mixlora_ds.train.compiled_layers import copy_gradients_out


class ReplayedScale(torch.autograd.Function):
    """y = w * x, whose backward writes d w into memory that every call reuses, handed out as a
    fresh tensor over it each time (what a CUDA-graph replay's outputs are)."""

    memory: torch.UntypedStorage | None = None

    @staticmethod
    def forward(ctx, w, x):
        ctx.save_for_backward(x)
        return w * x

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        if ReplayedScale.memory is None:
            ReplayedScale.memory = torch.empty_like(x).untyped_storage()
        grad_w = x.new_empty(0).set_(ReplayedScale.memory, 0, x.shape, x.stride())
        torch.mul(grad_y, x, out=grad_w)
        return grad_w, None


def _accumulate(copy: bool) -> torch.Tensor:
    ReplayedScale.memory = None
    w = torch.nn.Parameter(torch.ones(4))
    if copy:
        copy_gradients_out([w])
    for x in (torch.full((4,), 1.0), torch.full((4,), 2.0), torch.full((4,), 4.0)):
        ReplayedScale.apply(w, x).sum().backward()
    return w.grad


def test_accumulated_gradients_survive_a_backward_that_reuses_its_memory():
    torch.testing.assert_close(_accumulate(copy=True), torch.full((4,), 7.0))
    # The hazard the copy removes: the first gradient became .grad, and the replays wrote over it.
    assert not torch.equal(_accumulate(copy=False), torch.full((4,), 7.0))
