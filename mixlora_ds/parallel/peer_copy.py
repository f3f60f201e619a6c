"""Gathers by copy engine: every rank maps the other ranks' frozen shards and copies them itself.

An NCCL all-gather runs as a kernel on some of the GPU's SMs for as long as the transfer takes;
overlapped with the training step's kernels it takes those SMs from them, and they run slower
(BENCHMARKS.md measures by how much). The GPUs of one host can instead read each other's memory:
with the shards in symmetric memory (mapped into every rank of the group once, at start), a gather
is one ``cudaMemcpyAsync`` per rank, which the copy engines carry without any SM. And because frozen
shards never change, no rank needs to wait for another: no collective, no barrier, so a rank that
runs late delays nobody's gathers.

Needs CUDA, PyTorch's symmetric memory and every rank of the group on one host (peer access over
NVLink or PCIe). ``check_available`` says why not, where not.
"""

from __future__ import annotations

import socket
import warnings

import torch
import torch.distributed as tdist

_streams: dict[int, torch.cuda.Stream] = {}


def _host_id() -> str:
    """What tells hosts apart: the kernel's boot id (containers of one host share it, while their
    hostnames may differ or all read "localhost"), else the hostname."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _agree(group, failure: str | None) -> str | None:
    """Every rank's verdict, the first failure of any rank (collective: all ranks decide alike)."""
    failures = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(failures, failure, group=group)
    return next((f for f in failures if f is not None), None)


def check_available(group, device: torch.device) -> str | None:
    """None when gathers by copy engine work for ``group`` on ``device``, else why not. Collective;
    every rank returns the same answer."""
    group = group or tdist.group.WORLD
    if device.type != "cuda":  # the same on every rank of a run
        return f"the frozen base is on {device.type}, not CUDA"
    failure = None
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        failure = f"this PyTorch ({torch.__version__}) has no symmetric memory"
    ranks = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(ranks, (_host_id(), failure), group=group)
    hosts = {host for host, _ in ranks}
    if len(hosts) > 1:
        return f"the ranks of the group run on {len(hosts)} hosts; copy engines reach one host's GPUs only"
    if (failure := next((f for _, f in ranks if f is not None), None)) is not None:
        return failure
    # GPUs without peer access (some PCIe hosts, some VMs) cannot map each other's memory: try it.
    # The allocation is local, so a rank that fails there says so before anyone enters the mapping.
    try:
        probe = allocate(256, torch.float32, device)
    except Exception as e:  # noqa: BLE001 - any failure means: not here
        failure = f"symmetric memory could not be allocated on {socket.gethostname()}: {e!r}"
    if (failure := _agree(group, failure)) is not None:
        return failure
    try:
        mapped = map_peers(probe, group)  # kept until every rank has mapped it (the _agree below)
    except Exception as e:  # noqa: BLE001
        failure, mapped = f"mapping the other ranks' memory failed on {socket.gethostname()}: {e!r}", None
    failure = _agree(group, failure)
    del mapped, probe
    return failure


def allocate(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed 1-D tensor in symmetric memory (``map_peers`` then maps it into every rank)."""
    import torch.distributed._symmetric_memory as symm_mem

    return symm_mem.empty(numel, dtype=dtype, device=device).zero_()


def map_peers(buf: torch.Tensor, group) -> tuple[list[torch.Tensor], object]:
    """Map every rank's ``buf`` (from ``allocate``, the same size on every rank, its contents final:
    frozen) into this rank. Collective. Returns one tensor per rank of the group aliasing that rank's
    buffer, and the handle that keeps the mappings alive."""
    import torch.distributed._symmetric_memory as symm_mem

    group = group or tdist.group.WORLD
    # Peers may read ``buf`` as soon as the mapping exists: what was queued to fill it must be done.
    torch.cuda.current_stream(buf.device).synchronize()
    with warnings.catch_warnings():  # needed before PyTorch 2.9, a deprecated no-op after
        warnings.simplefilter("ignore", FutureWarning)
        symm_mem.enable_symm_mem_for_group(group.group_name)
    handle = symm_mem.rendezvous(buf, group.group_name)
    peers = [handle.get_buffer(r, (buf.numel(),), buf.dtype) for r in range(tdist.get_world_size(group))]
    return peers, handle


def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of ``device`` that every gather by copy engine runs on, in the order issued.
    (One is enough: the copies share the GPU's NVLink bandwidth, so a stream per peer makes them no
    faster; BENCHMARKS.md.)"""
    if device.index not in _streams:
        _streams[device.index] = torch.cuda.Stream(device)
    return _streams[device.index]


class PeerGather:
    """The gather of one flat buffer: copy every rank's shard (``peers[r]``) into its slice of
    ``full``, own slice first, then the others in ring order from this rank (so the ranks start on
    different peers), on the copy stream.

    Built once per buffer and restarted for every gather, so a gather costs the host only its copies
    and two events: it runs once per layer in forward and again in backward, on the host's critical
    path when the step is host-bound.
    """

    def __init__(self, full: torch.Tensor, peers: list[torch.Tensor], rank: int):
        n, world = peers[0].numel(), len(peers)
        # Views of ``full`` follow its storage when it is freed and allocated again.
        self.copies = [(full[r * n:(r + 1) * n], peers[r]) for r in ((rank + s) % world for s in range(world))]
        self.stream = copy_stream(full.device)
        self.ready, self.done = torch.cuda.Event(), torch.cuda.Event()
        self.allocating_stream: torch.cuda.Stream | None = None

    def start(self) -> None:
        """Start the copies. ``full``'s memory has just been allocated on the current stream, so they
        start after what that stream has queued so far (which may still use that memory's previous
        contents); they need not wait for any other rank."""
        current = torch.cuda.current_stream(self.stream.device)
        self.ready.record(current)
        self.stream.wait_event(self.ready)
        # (set_stream also makes the stream's GPU current: a rank's own, the one it already uses.)
        torch.cuda.set_stream(self.stream)
        try:
            for dst, src in self.copies:
                dst.copy_(src)
        except BaseException:
            self.stream.synchronize()  # copies already queued must not outlive the memory they write
            raise
        finally:
            torch.cuda.set_stream(current)
        self.done.record(self.stream)
        self.allocating_stream = current

    def wait(self) -> None:
        """Make the current stream wait for the copies. Freed memory goes back to the stream that
        allocated it, for that stream's next allocations: that stream waits too, so the memory is
        never handed on while a copy may still write it."""
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_event(self.done)
        if current != self.allocating_stream:
            self.allocating_stream.wait_event(self.done)
