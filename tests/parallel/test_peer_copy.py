"""Gathers by copy engine say why they cannot run where they cannot (their GPU path runs in
``shard_probe.py`` with ``MIXLORA_PROBE_DEVICE=cuda``, and in ``benchmarks/bench_zero.py --check``)."""

from __future__ import annotations

import torch

from mixlora_ds.parallel import peer_copy


def test_copy_engine_gathers_need_cuda():
    why_not = peer_copy.check_available(None, torch.device("cpu"))
    assert why_not == "the frozen base is on cpu, not CUDA"
