#!/usr/bin/env python
"""Train a MixLoRA (or LoRA/DoRA) adapter on a frozen base model with DeepSpeed.

One process (CPU or one GPU):
    python launch/train.py --config configs/tiny.yaml
One node, N processes (GPUs; on CPU add DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1):
    deepspeed --num_gpus N launch/train.py --config configs/llama2-7b-mixlora.yaml
    torchrun --standalone --nproc_per_node N launch/train.py --config configs/llama2-7b-mixlora.yaml
    mpirun -np N python launch/train.py --config configs/llama2-7b-mixlora.yaml
        (ranks from Open MPI's or MPICH's variables; across nodes rank 0's host comes from mpi4py,
        pip install mixlora_ds[mpi], or mpirun -x MASTER_ADDR=HOST)
Several nodes (Slurm; one task per GPU, ranks taken from SLURM_* variables):
    sbatch --nodes 2 launch/slurm/train.sbatch configs/llama2-7b-mixlora.yaml
    (or inside an allocation: srun --ntasks-per-node 8 python launch/train.py --config ...)
Overrides, then resume after preemption:
    ... launch/train.py --config configs/tiny.yaml --optim.lr 1e-4 --batch.global_batch_size 16
    ... launch/train.py --config configs/tiny.yaml --resume auto

An output directory belongs to one run (its id is in <output_dir>/run.json and in every checkpoint):
a start without --resume where another run left checkpoints or metrics is refused; continue that
run with --resume auto, or start anew in another output_dir or with --overwrite (which deletes only
what a training run writes there). Resuming cuts metrics.jsonl and TensorBoard back to the resumed
step. --resume auto verifies every file of a checkpoint (sizes and checksums recorded when it was
saved) and falls back to the newest intact one with a warning naming the damaged file.

Exit status:
    0   training finished, adapter exported (<output_dir>/train_complete.json written)
    75  stopped early by SIGTERM/SIGUSR1 or because the launcher died: a checkpoint was saved,
        resume with --resume auto (launch/slurm/train.sbatch requeues the job on 75)
    2   a bad config (named file:line and key, reported before any communication), or a checkpoint
        that cannot be used or written (damaged, another run's directory, a full disk: named)
    3   the loss or gradient norm stopped being finite (nothing saved after it)
    1   anything else, e.g. another rank died (reported within deepspeed.timeout_minutes)
Signals go to the ranks: Slurm signals every task, and the `deepspeed` per-node launcher forwards a
SIGTERM to them (it kills ranks still saving after 30 s). A SIGTERM to the `deepspeed` command itself,
or any death of the launcher, is not forwarded: each rank notices its launcher gone within a second and
stops as on SIGTERM. The `deepspeed` command exits with its ranks' 75; torchrun reports it as a failed
worker and exits 1 (the checkpoint is there all the same); for preemptible Slurm jobs use
launch/slurm/train.sbatch (srun, one task per GPU: the exit status is the ranks').
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--resume", default=None,
                   help="'auto' (this run's newest intact checkpoint, if any), a checkpoint directory, or 'none'")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output directory that holds another run's outputs, deleting "
                        "them first (checkpoints, metrics, TensorBoard events, adapter, markers; nothing else)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--validate-only", action="store_true", help="check the config and exit")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from mixlora_ds.train.signals import started_by_launcher

    watch_launcher = started_by_launcher()  # judged before any variable is filled in below
    # torch.distributed warns on every ZeRO-3 gather/reduce that DeepSpeed uses a deprecated name.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)

    from mixlora_ds import dist

    dist.map_launcher_env()
    from mixlora_ds.train.monitor import setup_logging

    rank = dist.rank()
    setup_logging(rank)

    from mixlora_ds.config import ConfigError
    from mixlora_ds.train.checkpoint import CheckpointError
    from mixlora_ds.train.config import TrainConfigError, load_config
    from mixlora_ds.train.plan import make_plan

    try:
        cfg = load_config(args.config, overrides)
        plan = make_plan(cfg, dist.world_size())
    except (TrainConfigError, ConfigError) as e:
        # Every rank reads the same files and fails the same way, before any collective.
        print(f"[rank {rank}] config error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.validate_only:
        if rank == 0:
            print(f"{args.config}: OK ({plan.total_steps} steps, ZeRO stage {plan.stage}, {plan.precision}, "
                  f"world {plan.world_size}, grad accum {plan.grad_accum})")
        return 0

    dist.init_distributed(cfg.deepspeed.timeout_minutes)
    from mixlora_ds.train.loop import train

    try:
        code = train(plan, args.resume, overwrite=args.overwrite, watch_launcher=watch_launcher)
        dist.shutdown()
        return code
    except CheckpointError as e:
        if rank == 0 or not e.same_on_every_rank:
            print(f"[rank {rank}] checkpoint error: {e}", file=sys.stderr, flush=True)
        return 2
    except FloatingPointError as e:  # raised on every rank at the same step; nothing is saved after it
        print(f"[rank {rank}] training diverged: {e}", file=sys.stderr, flush=True)
        dist.shutdown()
        return 3
    except Exception as e:
        if not dist.is_peer_failure(e):
            raise
        # No shutdown: its barrier would wait for the rank that is gone.
        print(f"[rank {rank}] lost another rank ({type(e).__name__}: {str(e).splitlines()[0][:300]}): a rank "
              f"died or its host became unreachable; this rank stops. Resume with --resume auto from the last "
              f"checkpoint", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    from mixlora_ds.dist import exit_now

    exit_now(main())
