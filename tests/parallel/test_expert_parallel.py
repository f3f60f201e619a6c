"""Expert parallelism: the dispatcher's permutation and its inverse, the layout, the cost model against
hand counts, expert resharding; and, on 2 and 4 real gloo ranks, logits, loss and every adapter
gradient against one process (``ep_probe.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest
import torch

from mixlora_ds.model.router import top_k_routing, top_p_routing
from mixlora_ds.parallel.ep_cost import estimate, expected_visits
from mixlora_ds.parallel.expert_parallel import ExpertParallelLayout, plan_visits, sum_visits
from mixlora_ds.train.expert_checkpoint import cut_experts

PROBE = Path(__file__).with_name("ep_probe.py")


# ----------------------------------------------------------------------------------------- units
def test_layout_groups_consecutive_ranks_and_their_expert_replicas():
    layout = ExpertParallelLayout(world_size=8, ep_size=4, rank=6)
    assert layout.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.edp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.ep_rank == 2 and layout.first_expert(16) == 8 and layout.experts_per_rank(16) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        ExpertParallelLayout(world_size=6, ep_size=4, rank=0)
    with pytest.raises(ValueError, match="evenly"):
        layout.experts_per_rank(6)


@pytest.mark.parametrize("routing", ["top_k", "top_p"])
def test_visits_send_each_token_once_per_owning_rank_and_sum_back(routing):
    gen = torch.Generator().manual_seed(0)
    T, E, P = 9, 8, 4
    logits = torch.randn(T, E, generator=gen) * 2
    r = top_k_routing(logits, 3) if routing == "top_k" else top_p_routing(logits, 0.7, 0.0, True)
    v = plan_visits(r.expert_TK, r.weight_TK, P, E // P)
    # Plain loops: the ranks owning a served slot of each token, in rank then token order.
    expected = [(p, t) for p in range(P) for t in range(T)
                if any(int(e) // (E // P) == p and float(w) != 0 for e, w in zip(r.expert_TK[t], r.weight_TK[t]))]
    assert list(zip(v.rank_V.tolist(), v.token_V.tolist())) == expected
    assert v.send_counts_P.tolist() == [sum(1 for p, _ in expected if p == q) for q in range(P)]
    for i, (p, t) in enumerate(expected):
        for k in range(r.expert_TK.shape[1]):
            e, w = int(r.expert_TK[t, k]), float(r.weight_TK[t, k])
            if e // (E // P) == p and w != 0:
                assert int(v.expert_VK[i, k]) == e - p * (E // P) and float(v.weight_VK[i, k]) == w
            else:
                assert float(v.weight_VK[i, k]) == 0
    # The inverse: summing each visit's row back gives, per token, the sum over its owners.
    y = torch.randn(len(expected), 5, generator=gen)
    back = sum_visits(y, v.token_V, T)
    for t in range(T):
        rows = [i for i, (_, tt) in enumerate(expected) if tt == t]
        assert torch.allclose(back[t], y[rows].sum(0) if rows else torch.zeros(5))
    # Every served slot weight reaches exactly one visit.
    assert torch.allclose(v.weight_VK.sum(), r.weight_TK.sum())


def test_expected_visits_and_traffic_against_hand_counts():
    # 8 experts on 2 ranks, top-2: a token stays on one rank when both experts are among that rank's
    # 4, P(one rank) = 2 * C(4,2)/C(8,2) = 12/28, so visits = 1 + 16/28.
    assert expected_visits(8, 2, 2) == pytest.approx(1 + 16 / 28)
    assert expected_visits(8, 2, 8) == pytest.approx(2.0)  # one expert per rank: always 2 ranks
    assert expected_visits(8, 1, 4) == pytest.approx(1.0)
    c = estimate(hidden=10, intermediate=20, num_layers=3, num_experts=4, rank=2, top_k=1, tokens_per_rank=6,
                 ep_size=2, world_size=4, grad_accum=2, activation_bytes=2, checkpointing=False)
    # top-1: v = 1, half the visits remote: 3 rows. Forward: 3 x (H out + H back) x 2 bytes + route 2*1*4
    # bytes out + 2 counts x 8 bytes; backward: the same rows and routes again, no counts.
    forward = 3 * (2 * 10 * 2 + 2 * 1 * 4) + 2 * 8
    backward = 3 * (2 * 10 * 2 + 2 * 1 * 4)
    assert c.visits_per_token == pytest.approx(1.0)
    assert c.bytes_per_layer == pytest.approx(forward + backward)
    assert c.bytes_per_step == pytest.approx((forward + backward) * 3 * 2)
    assert c.extra_flops_per_step == 0
    n = 3 * 2 * (10 + 20) * 4 * 3  # 3 projections x r (H + I) per expert, 4 experts, 3 layers
    assert c.expert_params == n
    assert c.memory_saved_bytes == pytest.approx(2 * n + 14 * n / 4 - 16 * n / 2)
    assert c.grad_sync_bytes_saved == pytest.approx(2 * 2 * n * 3 / 4 - 2 * 4 * n / 2 * 1 / 2)
    top2 = estimate(10, 20, 3, 4, 2, 2, 6, 2, checkpointing=True)
    v = 2 * (1 - comb(2, 2) / comb(4, 2))
    assert top2.visits_per_token == pytest.approx(v)
    assert top2.extra_flops_per_step == pytest.approx((v - 1) * 6 * 2 * 3 * 10 * 20 * 3 * 3)


def test_cut_experts_reshards_between_ep_sizes():
    full = {"p": torch.arange(8 * 3, dtype=torch.float32).view(8, 3)}
    saved = [{"first_expert": f, "state": {"w": {"param": full["p"][f:f + 2], "step": 5.0}}} for f in (0, 2, 4, 6)]
    for first, count in ((0, 4), (4, 4), (2, 2), (0, 8)):
        got = cut_experts(saved, first, count)["w"]
        assert torch.equal(got["param"], full["p"][first:first + count]) and got["step"] == 5.0


# ------------------------------------------------------------------------------ real gloo ranks
def _probe(tmp_path: Path, nproc: int, ep: int, experts: int, cases: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                        str(PROBE), str(tmp_path), str(ep), str(experts), ",".join(cases)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return {r: json.loads((tmp_path / f"ep_rank{r}.json").read_text()) for r in range(nproc)}


def _assert_equal_to_one_process(results: dict, cases: list[str]) -> None:
    for rank, per_case in results.items():
        for case in cases:
            got = per_case[case]
            assert got["checked"] >= 22, (rank, case)  # every adapter tensor, experts included
            assert got["logits"] <= 1e-5 and got["loss"] <= 1e-5, (rank, case, got)
            assert got["grads"] <= 1e-5 and got["grad_scale"] > 1e-3, (rank, case, got)


ALL_CASES = ["topk", "top1", "topk_grouped", "topk_loop", "top_p", "switch", "dora", "padding", "skewed", "bias"]


@pytest.mark.distributed
def test_ep2_on_two_ranks_equals_one_process(tmp_path):
    results = _probe(tmp_path, 2, 2, 4, ALL_CASES)
    _assert_equal_to_one_process(results, ALL_CASES)
    # The skewed case sends every token to EP rank 0: rank 1's experts, and rank 1, receive nothing.
    assert results[1]["skewed"]["zero_received"] and results[1]["skewed"]["received"] == [0, 0]
    assert all(n > 0 for n in results[0]["skewed"]["received"])


@pytest.mark.distributed
@pytest.mark.parametrize("ep, cases", [(4, ["topk", "top_p", "skewed", "dora"]),
                                       (2, ["topk", "switch", "padding", "skewed"])])
def test_four_ranks_equal_one_process(tmp_path, ep, cases):
    """EP 4 (one expert per rank), and 2 data-parallel x 2 expert-parallel."""
    results = _probe(tmp_path, 4, ep, 4, cases)
    _assert_equal_to_one_process(results, cases)
