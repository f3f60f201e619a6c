"""Rank-0 reporting: TensorBoard scalars and images, a tqdm bar and one console line per interval.

Tags written (all under one event directory)::

    train/loss  train/ce_loss  train/aux_loss  train/lr  train/grad_norm
    train/task_loss/<task>                 per-task cross-entropy over real answer tokens
    perf/tokens_per_s  perf/tokens_per_s_per_device   real (non-padding) tokens, all ranks / per rank
    perf/tflops  perf/mfu (only with logging.peak_tflops)   model FLOPs per device (metrics.flop_per_token)
    perf/peak_mem_gb                       peak device memory (peak RSS on CPU) of rank 0
    moe/layer_<i>/expert_<e>_load          fraction of (token, top-k) routes sent to expert e
    moe/layer_<i>/router_entropy           mean entropy of the router distribution, in nats
    moe/layer_<i>/tokens_dropped           (switch routing only) tokens past expert capacity
    moe/expert_load                        image: layers x experts heatmap
    eval/loss

Nothing here communicates: the loop reduces the statistics once per logging step and hands the
numbers to rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

import numpy as np

log = logging.getLogger("mixlora_ds.train")


class Monitor:
    def __init__(self, tb_dir: str | None, enabled: bool, total_steps: int, progress_bar: bool, start_step: int = 0,
                 purge_step: int | None = None):
        """``purge_step``: on resume, the first step this run logs again; TensorBoard then discards the
        events that earlier writers in ``tb_dir`` logged from that step on."""
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tb_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tb_dir, purge_step=purge_step)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None and math.isfinite(float(v)):
                self.writer.add_scalar(tag, float(v), step)
            elif v is not None:
                log.warning("not logging non-finite %s=%s at step %d", tag, v, step)

    def moe(self, step: int, load_LE: np.ndarray, entropy_L: np.ndarray, dropped_L: np.ndarray | None,
            heatmap: bool) -> None:
        if self.writer is None:
            return
        L, E = load_LE.shape
        for i in range(L):
            for e in range(E):
                self.writer.add_scalar(f"moe/layer_{i}/expert_{e}_load", float(load_LE[i, e]), step)
            self.writer.add_scalar(f"moe/layer_{i}/router_entropy", float(entropy_L[i]), step)
            if dropped_L is not None:
                self.writer.add_scalar(f"moe/layer_{i}/tokens_dropped", float(dropped_L[i]), step)
        if heatmap:
            self.writer.add_image("moe/expert_load", heatmap_image(load_LE), step, dataformats="HWC")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self, n: int = 1, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def heatmap_image(load_LE: np.ndarray, cell: int = 16) -> np.ndarray:
    """A layers x experts load matrix as an RGB uint8 image, each cell ``cell`` pixels square.

    Colour runs dark blue (no load) to yellow (the largest load in the matrix); no plotting
    library is needed.
    """
    m = np.asarray(load_LE, dtype=np.float64)
    top = m.max() if m.size and m.max() > 0 else 1.0
    t = np.clip(m / top, 0.0, 1.0)
    low, high = np.array([20, 30, 90], dtype=np.float64), np.array([250, 230, 40], dtype=np.float64)
    rgb = (low[None, None, :] * (1 - t[..., None]) + high[None, None, :] * t[..., None]).astype(np.uint8)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)


def peak_memory_gb() -> float:
    """Peak device memory of this process; on CPU the peak resident set size."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return acc.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
