"""Route, dispatch, grouped expert matmul and combine, each against a plain reference."""

import pytest
import torch

from mixlora_ds import MixLoraConfig
from mixlora_ds.model.pair_order import gather_pairs, mix_pairs, sort_pairs_by_expert
from mixlora_ds.model.grouped_mm import grouped_mm
from mixlora_ds.model.router import MixLoraRouter, switch_routing, top_k_routing, top_p_routing


def test_top_k_renormalised_softmax_before_topk():
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    r = top_k_routing(logits, 2)
    p = logits.softmax(-1)
    for t in range(20):
        order = p[t].argsort(descending=True)[:2]
        assert set(r.expert_TK[t].tolist()) == set(order.tolist())
        assert torch.allclose(r.weight_TK[t].sum(), torch.tensor(1.0))
        assert torch.allclose(r.weight_TK[t], p[t, r.expert_TK[t]] / p[t, order].sum())
    assert torch.equal(r.selected_TE.sum(-1), torch.full((20,), 2.0))


def test_top_p_keeps_up_to_first_exceeding_and_fixes_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    r = top_p_routing(logits, top_p=0.7, temperature=0.0, renormalize=False)
    assert r.selected_TE.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # 0.5 < 0.7 then 0.8 > 0.7: keep both
    assert torch.allclose(r.weight_TK.sum(), torch.tensor(0.8))  # MoE-PEFT's unrenormalised weights
    assert torch.allclose(top_p_routing(logits, 0.7, 0.0, True).weight_TK.sum(), torch.tensor(1.0))
    # temperature divides logits: a low temperature sharpens, so fewer experts are kept
    # (the reference divided probabilities, which selected every expert)
    sharp = top_p_routing(logits, top_p=0.7, temperature=0.1, renormalize=True)
    assert sharp.selected_TE.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_switch_capacity_per_sequence_in_token_order():
    logits = torch.tensor([[5.0, 0, 0]] * 4 + [[0, 5.0, 0]] * 2)  # 2 sequences of 3 tokens
    r = switch_routing(logits, capacity=2, seq_len=3)
    # sequence 0: tokens 0,1,2 all want expert 0; the third is over capacity
    assert r.passthrough_T.tolist() == [False, False, True, False, False, False]
    assert r.weight_TK[2].item() == 0.0
    assert switch_routing(logits, capacity=None, seq_len=3).passthrough_T is None  # inference: no cap


def test_router_fp32_and_jitter_not_in_place():
    from mixlora_ds import inject_mixlora
    from tests.core.tiny_models import tiny_model

    router = MixLoraRouter(8, MixLoraConfig(num_experts=4))
    assert router.weight.dtype == torch.float32
    assert router(torch.randn(5, 8, dtype=torch.bfloat16)).probs_TE.dtype == torch.float32

    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, jitter_noise=0.2, lora_dropout=0.0))
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    x_copy = x.clone()
    block.train()
    y1, y2 = block(x), block(x)
    assert torch.equal(x, x_copy)  # the caller's tensor is untouched
    assert not torch.allclose(y1, y2)  # jitter active in training
    block.eval()
    assert torch.equal(block(x), block(x))  # and off in eval


def _naive_plan(expert_TK):
    pairs = [(e, t, k) for t in range(expert_TK.shape[0]) for k, e in enumerate(expert_TK[t].tolist())]
    return sorted(pairs)  # expert order, then token order


def test_pair_order_against_plain_loops():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen)
    routing = top_k_routing(logits, 3)
    plan = sort_pairs_by_expert(routing.expert_TK, routing.weight_TK, routing.num_experts)
    x = torch.randn(7, 4, generator=gen)
    naive = _naive_plan(routing.expert_TK)
    assert plan.token_P.tolist() == [t for _, t, _ in naive]
    assert torch.equal(gather_pairs(plan, x), x[[t for _, t, _ in naive]])
    counts = torch.bincount(routing.expert_TK.reshape(-1), minlength=5)
    assert plan.offs_E.tolist() == counts.cumsum(0).tolist()
    y_P = torch.randn(len(naive), 4, generator=gen)
    expected = torch.zeros(7, 4)
    for row, (_, t, k) in enumerate(naive):
        expected[t] += routing.weight_TK[t, k] * y_P[row]
    assert torch.allclose(mix_pairs(plan, y_P), expected, atol=1e-6)


@pytest.mark.parametrize("dims", [(16, 8), (6, 3)])  # aligned: torch._grouped_mm; unaligned: loop fallback
def test_grouped_mm_forward_backward(dims):
    k, n = dims
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 2]  # includes an expert with no rows
    x = torch.randn(sum(counts), k, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(4, k, n, generator=gen).requires_grad_()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = grouped_mm(x, w, offs)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    starts = [0] + offs[:-1].tolist()
    y_ref = torch.cat([x_ref[s:e] @ w_ref[i] for i, (s, e) in enumerate(zip(starts, offs.tolist()))])
    (y_ref * dy).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(w.grad, w_ref.grad, atol=1e-5)
    assert w.grad[1].abs().max() == 0
