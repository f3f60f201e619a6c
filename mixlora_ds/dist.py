"""Rank and environment helpers for the launchers this project supports.

`deepspeed` and `torchrun` set the five variables that ``torch.distributed``'s env:// rendezvous
reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Plain ``srun`` sets only SLURM_*
variables and ``mpirun`` only its own (OMPI_COMM_WORLD_* for Open MPI, PMI_* for MPICH and Intel
MPI); :func:`map_launcher_env` translates them before anything reads the world size or
initialises, so config validation already sees the right world.

Everything here works before ``torch.distributed`` is initialised (it then reads the environment),
so config validation can name the failing rank without any collective.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from typing import Any

import torch

DEFAULT_PORT = 29500


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist (``node[1-3,7],gpu05``) into host names.

    ``scontrol show hostnames`` is the authority; this parser is the fallback for environments
    where the client is not on PATH (e.g. inside a container started by srun).
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_hostlist(nodelist)


def parse_hostlist(nodelist: str) -> list[str]:
    """Pure-Python expansion of Slurm's compressed host lists (zero-padded ranges kept)."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            if "-" in rng:
                lo, hi = rng.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{rng}{suffix}")
    return hosts


def map_slurm_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM_* when a launcher did not.

    Only runs inside a Slurm job step (SLURM_PROCID set) and never overrides variables a launcher
    already set (``deepspeed``/``torchrun`` inside an allocation set their own). Rank order follows
    SLURM_PROCID; local rank follows SLURM_LOCALID, not host names, because Slurm's fake multi-node
    setups share one hostname. Returns what it set.
    """
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env or "RANK" in env:
        return {}
    updates = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        hosts = expand_slurm_nodelist(nodelist) if nodelist else []
        updates["MASTER_ADDR"] = hosts[0] if hosts else "127.0.0.1"
    if "MASTER_PORT" not in env:
        # One port per job so two jobs sharing a node do not collide.
        job = _env_int_from(env, "SLURM_JOB_ID", 0)
        updates["MASTER_PORT"] = str(20000 + job % 20000)
    env.update(updates)
    return updates


# (rank, world size, local rank, ranks on this node) variables of each MPI family.
_MPI_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def map_mpi_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the variables ``mpirun`` sets.

    Never overrides variables already set (a launcher's, or ``mpirun -x MASTER_ADDR=...``). When
    every rank runs on one node the rendezvous is 127.0.0.1, found without any communication. Across
    nodes rank 0's host name is broadcast with mpi4py (``pip install mixlora_ds[mpi]``); DeepSpeed's
    own MPI discovery is not used, since it takes the first address of ``hostname -I``, which is
    empty on hosts with loopback only. The port is derived from the MPI job id, so two jobs on one
    node do not collide. Returns what it set.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return {}
    names = next((n for n in _MPI_VARIABLES if n[0] in env), None)
    if names is None:
        return {}
    rank_var, size_var, local_rank_var, local_size_var = names
    updates = {"RANK": env[rank_var], "WORLD_SIZE": env.get(size_var, "1"),
               "LOCAL_RANK": env.get(local_rank_var, "0")}
    if "MASTER_ADDR" not in env:
        one_node = env.get(local_size_var, "") == updates["WORLD_SIZE"]
        updates["MASTER_ADDR"] = "127.0.0.1" if one_node else _mpi_rank0_host()
    if "MASTER_PORT" not in env:
        job = env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE") or ""
        digits = "".join(c for c in job if c.isdigit())
        updates["MASTER_PORT"] = str(20000 + int(digits) % 20000) if digits else str(DEFAULT_PORT)
    env.update(updates)
    return updates


def _mpi_rank0_host() -> str:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "mpirun started ranks on several nodes and MASTER_ADDR is not set: install mpi4py "
            "(pip install mixlora_ds[mpi]) so rank 0's host is found, or pass it: mpirun -x "
            "MASTER_ADDR=<rank 0's host> ...") from None
    import socket

    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)


def map_launcher_env() -> dict[str, str]:
    """The rendezvous variables from whichever launcher started this process (Slurm, then MPI)."""
    return map_slurm_env() or map_mpi_env()


def _env_int_from(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    return int(value) if value.isdigit() else default


def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce on the CPU accelerator.

    That op serves only inference all-reduce, costs 40-115 s of compilation on a fresh machine,
    leaves 66 MB /dev/shm segments behind per rank, and a process killed while it compiles leaves a
    lock that hangs every later start. Training uses gloo collectives either way. DeepSpeed keeps
    its op-compatibility table in one module-level dict precisely so it can be edited like this.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Initialise the process group through DeepSpeed (gloo on CPU, NCCL on GPU), once."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    map_launcher_env()
    skip_cpu_shm_comm_build()
    kwargs: dict[str, Any] = {"auto_mpi_discovery": "RANK" not in os.environ, "verbose": False}
    timeout = collective_timeout(timeout_minutes)
    if timeout is not None:
        kwargs["timeout"] = timeout
    # Without a launcher (python launch/train.py) run as a world of one.
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        kwargs["auto_mpi_discovery"] = False
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        # Before any model is built: zero.Init places each shard on the current device.
        get_accelerator().set_device(local_rank())
    deepspeed.init_distributed(**kwargs)


def collective_timeout(timeout_minutes: float | None = None) -> datetime.timedelta | None:
    """How long a collective may wait: ``timeout_minutes``, else DEEPSPEED_TIMEOUT (minutes), else
    None (the backend's default)."""
    if timeout_minutes is None and os.environ.get("DEEPSPEED_TIMEOUT"):
        timeout_minutes = float(os.environ["DEEPSPEED_TIMEOUT"])
    return None if timeout_minutes is None else datetime.timedelta(minutes=timeout_minutes)


def new_group(timeout_minutes: float | None = None):
    """A process group of all ranks (None with a world of one), with the run's collective timeout."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return None
    return torch.distributed.new_group(list(range(torch.distributed.get_world_size())),
                                       timeout=collective_timeout(timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group together: every rank waits for the others, then tears it down.

    Exiting with the group alive lets a rank's interpreter destroy gloo's threads while a peer is
    still finishing (rank 0 exporting the adapter, say), which aborts the process at exit.
    """
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()


def exit_now(code: int) -> None:
    """End a finished distributed entry point, skipping the interpreter's teardown.

    Call after ``shutdown()``, with everything written. The destructors of gloo / DeepSpeed worker
    threads were seen to abort a finished rank at interpreter exit ("terminate called without an
    active exception"), turning a good run into a failed one.
    """
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group (single-process tools, tests)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]
    return obj


_PEER_FAILURE_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                      "timed out", "Connection refused")


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (died, killed, host lost) or did
    not answer within the collective timeout, as gloo and NCCL report it."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(t in str(error) for t in _PEER_FAILURE_TEXT)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())
