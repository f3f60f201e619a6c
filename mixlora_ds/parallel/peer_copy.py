"""Gathers by copy engine: every rank maps the other ranks' frozen shards and copies them itself.

An NCCL all-gather runs as a kernel on some of the GPU's SMs (24 of 132 on an H200 pair), for as
long as the transfer takes; overlapped with the training step's kernels it slowed them by a sixth
(7B MixLoRA, 2 H200s: compute kernels 171 ms a step instead of 143; BENCHMARKS.md). The GPUs of one
host can instead read each other's memory: with the shards in symmetric memory (mapped into every
rank of the group once, at start), a gather is one ``cudaMemcpyAsync`` per rank, which the copy
engines carry without any SM. And because frozen shards never change, no rank needs to wait for
another: no collective, no barrier, so a rank that runs late delays nobody's gathers.

Needs CUDA, PyTorch's symmetric memory and every rank of the group on one host (peer access over
NVLink or PCIe). ``check_available`` says why not, where not.
"""

from __future__ import annotations

import socket
import warnings

import torch
import torch.distributed as tdist

_streams: dict[tuple[int, int], torch.cuda.Stream] = {}


def check_available(group, device: torch.device) -> str | None:
    """None when gathers by copy engine work for ``group`` on ``device``, else why not. Collective."""
    group = group or tdist.group.WORLD
    if device.type != "cuda":
        return f"the frozen base is on {device.type}, not CUDA"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return f"this PyTorch ({torch.__version__}) has no symmetric memory"
    hosts = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) > 1:
        return f"the ranks of the group run on {len(set(hosts))} hosts; copy engines reach one host's GPUs only"
    try:  # GPUs without peer access (some PCIe hosts, some VMs) cannot map each other's memory
        map_into_peers(torch.zeros(256, device=device), group)
        failure = None
    except Exception as e:  # noqa: BLE001 - any failure means: not here
        failure = f"mapping the other ranks' memory failed on {socket.gethostname()}: {e!r}"
    failures = [None] * len(hosts)
    tdist.all_gather_object(failures, failure, group=group)  # every rank decides alike
    return next((f for f in failures if f is not None), None)


def map_into_peers(local: torch.Tensor, group) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    """Move ``local`` (1-D, the same size on every rank) into symmetric memory and map every rank's
    copy. Collective. Returns (the new local tensor, one tensor per rank of the group aliasing that
    rank's buffer, the handle that keeps the mappings alive)."""
    import torch.distributed._symmetric_memory as symm_mem

    group = group or tdist.group.WORLD
    buf = symm_mem.empty(local.numel(), dtype=local.dtype, device=local.device)
    buf.copy_(local)
    with warnings.catch_warnings():  # needed before PyTorch 2.9, a deprecated no-op after
        warnings.simplefilter("ignore", FutureWarning)
        symm_mem.enable_symm_mem_for_group(group.group_name)
    handle = symm_mem.rendezvous(buf, group.group_name)
    peers = [handle.get_buffer(r, (local.numel(),), local.dtype) for r in range(tdist.get_world_size(group))]
    return buf, peers, handle


def copy_stream(device: torch.device, index: int) -> torch.cuda.Stream:
    """The ``index``-th side stream of ``device`` for peer copies (copies on separate streams can
    run on separate copy engines at once)."""
    key = (device.index, index)
    if key not in _streams:
        _streams[key] = torch.cuda.Stream(device)
    return _streams[key]


class PeerCopies:
    """Pending copies of one gather: ``wait`` makes the current stream wait for all of them."""

    def __init__(self, events: list[torch.cuda.Event]):
        self.events = events

    def wait(self) -> None:
        stream = torch.cuda.current_stream()
        for e in self.events:
            stream.wait_event(e)


def gather_by_copy(full: torch.Tensor, peers: list[torch.Tensor], rank: int, streams: int) -> PeerCopies:
    """Start copying every rank's shard (``peers[r]``) into its slice of ``full``, own slice first,
    spread over ``streams`` side streams. ``full``'s memory comes from the current stream, so the
    copies start after what that stream has queued so far (which may still read that memory's
    previous contents); they need not wait for any other rank."""
    n, world = peers[0].numel(), len(peers)
    current = torch.cuda.current_stream(full.device)
    used: list[torch.cuda.Stream] = []
    for step in range(world):
        r = (rank + step) % world
        stream = copy_stream(full.device, step % streams)
        if stream not in used:
            stream.wait_stream(current)
            used.append(stream)
        with torch.cuda.stream(stream):
            full[r * n:(r + 1) * n].copy_(peers[r])
    return PeerCopies([stream.record_event() for stream in used])
