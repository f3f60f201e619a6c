"""The optimized paths (dense, grouped) equal the plain per-expert loop, in forward and in every gradient."""

import pytest
import torch

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.model.aux_loss import mixlora_aux_loss
from mixlora_ds.model.moe import set_compute_path
from tests.core.tiny_models import VOCAB, randomize_adapter, targets_for, tiny_model

CASES = [
    # (model_type, config overrides, batch, seq)
    ("llama", dict(num_experts=4, top_k=2), 2, 9),
    ("llama", dict(num_experts=4, top_k=1), 2, 9),
    ("llama", dict(num_experts=4, top_k=4), 2, 9),
    ("llama", dict(num_experts=8, top_k=2), 1, 4),  # most experts get no token
    ("llama", dict(num_experts=4, routing_strategy="mixlora-dynamic", top_p=0.6), 2, 7),
    ("llama", dict(num_experts=4, routing_strategy="mixlora-switch", expert_capacity=2), 2, 8),
    ("llama", dict(num_experts=4, top_k=2, target_modules=["q_proj", "gate_proj", "down_proj"]), 2, 5),
    ("phi3", dict(num_experts=4, top_k=2), 2, 6),
    ("phi", dict(num_experts=4, top_k=2), 2, 6),
    ("gemma2", dict(num_experts=4, top_k=2), 2, 6),
]


def _run(model_type, overrides, path, ids, mask, seed=0):
    model = tiny_model(model_type, seed=seed)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets_for(model_type))
    kwargs.update(overrides)
    inject_mixlora(model, MixLoraConfig(**kwargs))
    randomize_adapter(model)
    set_compute_path(model, path)
    model.train()  # training mode: switch capacity active; dropout is 0 so both paths are deterministic
    out = model(ids, attention_mask=mask)
    labels = ids.masked_fill(mask == 0, -100)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1)) + mixlora_aux_loss(model, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("model_type,overrides,batch,seq", CASES)
def test_optimized_equals_loop(model_type, overrides, batch, seq, path):
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -1:] = 0  # padding on the right of the first sequence
    logits_loop, grads_loop = _run(model_type, overrides, "loop", ids, mask)
    logits_grp, grads_grp = _run(model_type, overrides, path, ids, mask)
    assert (logits_loop - logits_grp).abs().max().item() <= 1e-5
    assert grads_loop.keys() == grads_grp.keys()
    nonzero = 0
    for name in grads_loop:
        diff = (grads_loop[name] - grads_grp[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff}"
        nonzero += int(grads_loop[name].abs().max() > 0)
    assert nonzero > len(grads_loop) // 2  # gradients actually flowed


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_recompute_changes_nothing(path):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    results = []
    for recompute in (True, False):
        model = tiny_model("llama")
        inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, num_experts=4))
        randomize_adapter(model)
        set_compute_path(model, path)
        for m in model.modules():
            if hasattr(m, "recompute"):
                m.recompute = recompute
        model.train()
        torch.manual_seed(0)  # same dropout masks in both runs: recomputation must replay them
        model(ids, attention_mask=mask).logits.pow(2).mean().backward()
        results.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=1e-6), name


def test_compiled_dense_equals_loop():
    """torch.compile of the dense path's per-pair math (the GPU option) computes the same function."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    results = {}
    for path, compiled in (("loop", False), ("dense", True)):
        model = tiny_model("llama")
        inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4))
        randomize_adapter(model)
        set_compute_path(model, path, compiled=compiled)
        model.train()
        logits = model(ids, attention_mask=mask).logits
        logits.square().mean().backward()
        results[path] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert (results["loop"][0] - results["dense"][0]).abs().max().item() <= 1e-5
    for name, g in results["loop"][1].items():
        assert (g - results["dense"][1][name]).abs().max().item() <= 1e-5, name
