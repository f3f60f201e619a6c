"""Load-balance loss against the MoE-PEFT formula, written here from the reference notes (§2)."""

import torch

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.model.aux_loss import mixlora_aux_loss
from mixlora_ds.model.moe import moe_blocks
from tests.core.tiny_models import VOCAB, randomize_adapter, tiny_model


def moe_peft_formula(router_logits_per_layer, attention_mask, top_k, num_experts):
    """Concatenate all layers' logits, one-hot top-k membership [N, K, E], masked means, pooled."""
    R = torch.cat(router_logits_per_layer, dim=0)
    p = torch.softmax(R, dim=-1)
    _, idx = torch.topk(p, top_k, dim=-1)
    M = torch.nn.functional.one_hot(idx, num_experts).float()  # [N, K, E]
    layers = len(router_logits_per_layer)
    mask = attention_mask.reshape(-1).float().repeat(layers)  # the 2-D mask repeated for every layer
    f = (M * mask[:, None, None]).sum(0) / mask.sum()  # [K, E]
    P = (p * mask[:, None]).sum(0) / mask.sum()  # [E]
    return num_experts * (f * P[None, :]).sum()


def test_aux_loss_matches_moe_peft_formula():
    model = tiny_model("llama")
    cfg = MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, router_aux_loss_coef=0.01)
    inject_mixlora(model, cfg)
    randomize_adapter(model, std=0.5)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    model.eval()
    model(ids, attention_mask=mask)
    ours = mixlora_aux_loss(model, mask)
    logits = [b.last_routing.logits_TE for b in moe_blocks(model)]
    expected = 0.01 * moe_peft_formula(logits, mask, 2, 4)
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0)
    # pooled over layers is not the mean of per-layer losses (the two differ on this input)
    per_layer = sum(moe_peft_formula([lg], mask, 2, 4) for lg in logits) / len(logits)
    assert not torch.allclose(expected, 0.01 * per_layer, rtol=1e-4)
    # padding rows are excluded: the loss changes when they are counted
    assert not torch.allclose(ours, mixlora_aux_loss(model, None), rtol=1e-4)


def test_aux_loss_reaches_router_only_and_is_k_when_balanced():
    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, router_aux_loss_coef=1.0))
    with torch.no_grad():
        for b in moe_blocks(model):
            b.router.weight.zero_()  # uniform router: P_e = 1/E and, by ties, F sums to K
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    model(ids)
    loss = mixlora_aux_loss(model)
    # F_e * P_e summed = K * (1/E); times E gives K exactly when P is uniform
    assert abs(loss.item() - 2.0) < 1e-6
    randomize_adapter(model)
    model(ids)
    mixlora_aux_loss(model).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # every router gets a gradient; the last layer's experts feed no router, so theirs stays empty
    # (earlier LoRAs do get one: they shape the hidden states that later routers see)
    for name, g in grads.items():
        if name.endswith("router.weight"):
            assert g is not None and g.abs().max() > 0, name
        if name.startswith("model.layers.1.mlp.experts."):
            assert g is None or g.abs().max() == 0, name


def test_router_loss_off_and_switch_z_loss():
    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, router_loss=False))
    model(torch.randint(3, VOCAB, (1, 5)))
    assert mixlora_aux_loss(model).item() == 0.0

    model = tiny_model("llama")
    cfg = MixLoraConfig(r=4, lora_alpha=8, num_experts=4, routing_strategy="mixlora-switch",
                        router_aux_loss_coef=0.0, router_z_loss_coef=1.0)
    inject_mixlora(model, cfg)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    model.eval()
    model(ids, attention_mask=mask)
    rows = torch.cat([b.last_routing.logits_TE for b in moe_blocks(model)])
    keep = mask.reshape(-1).bool().repeat(2)
    expected = torch.logsumexp(rows[keep], dim=-1).square().mean()
    assert torch.allclose(mixlora_aux_loss(model, mask), expected, rtol=1e-6)


def test_routing_statistics_match_a_per_layer_loop():
    """All layers at once (``statistics_of``) against each layer on its own, in float64, with padding
    and switch tokens dropped over capacity."""
    from mixlora_ds.model.stats import routing_statistics

    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, num_experts=4, routing_strategy="mixlora-switch",
                                        expert_capacity=2))
    randomize_adapter(model, std=0.5)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    model.train()
    model(ids, attention_mask=mask)
    stats = routing_statistics(model, mask)
    real = mask.reshape(-1).bool()
    for layer, block in enumerate(moe_blocks(model)):
        r = block.last_routing
        probs = r.probs_TE.double()[real]
        counts = r.selected_TE.double()[real].sum(0)
        entropy = -(probs * probs.log()).sum(-1).mean()
        dropped = r.passthrough_T[real].sum()
        torch.testing.assert_close(stats.counts_LE[layer].double(), counts)
        torch.testing.assert_close(stats.load_LE[layer].double(), counts / counts.sum())
        torch.testing.assert_close(stats.entropy_L[layer].double(), entropy, rtol=1e-6, atol=0)
        assert stats.dropped_L[layer].item() == dropped.item()
    assert stats.tokens.item() == real.sum().item()
    assert stats.dropped_L.sum() > 0  # the capacity did drop tokens: the passthrough count is exercised
