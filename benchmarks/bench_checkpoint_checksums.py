"""What recording and verifying checkpoint checksums costs, next to writing the checkpoint.

    python benchmarks/bench_checkpoint_checksums.py --dir /tmp/bench_ckpt --params 2.03e8 --world 8

Writes a checkpoint with the file layout of a ZeRO-2 adapter checkpoint of ``--params`` trainable
parameters on ``--world`` ranks (bf16 model states on rank 0; per rank an fp32 master copy and two
Adam moments of its 1/world partition; small per-rank state files), each file written and fsynced
as torch.save + the checkpoint manager do, then times ``file_manifest`` over the files rank 0 hashes
during a save (the model states and its own shards: the largest share; every rank hashes what it
wrote, at the same time), over all files (one process doing everything, for comparison), and
``verify_checkpoint`` (what ``--resume`` adds, on rank 0). The default size is
MixLoRA r=16, 8 experts, on LLaMA-2-7B: per decoder layer 8 x 3 expert LoRAs of 16 x (4096 + 11008),
four attention LoRAs of 16 x 8192 and a 8 x 4096 router, ~6.35 M, x 32 layers = 2.03e8 parameters.
Contents are random bytes (checksums do not care). Results go to stdout as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mixlora_ds.train.checkpoint import (COMPLETE, CheckpointInfo, file_manifest, verify_checkpoint,  # noqa: E402
                                         writer_rank)


def write_file(path: str, nbytes: int, chunk: bytes) -> None:
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="scratch directory (deleted afterwards)")
    ap.add_argument("--params", type=float, default=2.03e8, help="trainable parameters")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="best of N for each timing (shared machines)")
    args = ap.parse_args()

    path = os.path.join(args.dir, "step_00000100")
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(path)
    n = int(args.params)
    files = {"mp_rank_00_model_states.pt": 2 * n}
    for r in range(args.world):
        files[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = 12 * n // args.world
        files[f"rank_{r:05d}.pt"] = 8192
    chunk = os.urandom(64 * 2**20)
    t = time.time()
    for name, size in files.items():
        write_file(os.path.join(path, name), size, chunk)
    write_s = time.time() - t
    total = sum(files.values())

    rank0 = [name for name in files if writer_rank(name, args.world) == 0]
    manifest_s, rank0_s, verify_s = [], [], []
    for _ in range(args.rounds):
        t = time.time()
        file_manifest(path, rank0)
        rank0_s.append(time.time() - t)
        t = time.time()
        manifest = file_manifest(path)
        manifest_s.append(time.time() - t)
        with open(os.path.join(path, COMPLETE), "w") as f:
            json.dump({"step": 100, "files": manifest}, f)
        info = CheckpointInfo(path, 100, {"step": 100, "files": manifest})
        t = time.time()
        assert verify_checkpoint(info) is None
        verify_s.append(time.time() - t)
    shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps({
        "params": n, "world": args.world, "files": len(files), "bytes": total, "cpus": os.cpu_count(),
        "write_fsync_seconds": round(write_s, 2), "write_GBps": round(total / write_s / 1e9, 2),
        "rank0_bytes": sum(files[n] for n in rank0), "rank0_checksum_seconds": round(min(rank0_s), 2),
        "all_files_checksum_seconds": round(min(manifest_s), 2),
        "all_files_checksum_GBps": round(total / min(manifest_s) / 1e9, 2),
        "verify_seconds": round(min(verify_s), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
