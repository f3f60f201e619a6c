"""GPU tests (marker ``gpu``): decoder layers replayed as CUDA graphs (``model.cuda_graphs``) train
exactly as compiled layers without them, over steps that accumulate gradients and with an
evaluation forward between steps (the two ways replays overwriting their outputs could go wrong)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.model.aux_loss import mixlora_aux_loss
from mixlora_ds.model.moe import set_compute_path
from mixlora_ds.train.compiled_layers import begin_step, compile_layers, copy_gradients_out
from tests.core.tiny_models import VOCAB, randomize_adapter, targets_for, tiny_model

pytestmark = pytest.mark.gpu
STEPS, ACCUMULATE = 3, 3


def _train(overrides: dict, cuda_graphs: bool):
    """Parameters after STEPS AdamW steps of ACCUMULATE micro-batches each, and every micro-batch's loss."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4,
                                        target_modules=targets_for("llama"), **overrides))
    randomize_adapter(model, std=0.05)
    model.cuda().train()
    set_compute_path(model, "fused")
    params = [p for p in model.parameters() if p.requires_grad]
    compile_layers(model.model.layers, cuda_graphs=cuda_graphs)
    if cuda_graphs:
        copy_gradients_out(params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(STEPS):
        for _ in range(ACCUMULATE):
            ids = torch.randint(3, VOCAB, (2, 16), generator=gen).cuda()
            if cuda_graphs:
                begin_step()
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(),
                                                     ids[:, 1:].reshape(-1)) + mixlora_aux_loss(model)
            (loss / ACCUMULATE).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:  # an evaluation forward between steps, as the trainer's eval does
            model.eval()
            with torch.no_grad():
                if cuda_graphs:
                    begin_step()
                model(ids[:1])
            model.train()
    return [p.detach().cpu().clone() for p in params], losses


@pytest.mark.parametrize("overrides", [dict(top_k=2), dict(routing_strategy="mixlora-dynamic", top_p=0.6),
                                       dict(routing_strategy="mixlora-switch", expert_capacity=8)])
def test_cuda_graphs_train_as_compiled_layers_do(overrides):
    want_params, want_losses = _train(overrides, cuda_graphs=False)
    skips = counters["inductor"]["cudagraph_skips"]
    got_params, got_losses = _train(overrides, cuda_graphs=True)
    assert counters["inductor"]["cudagraph_skips"] == skips, "a compiled layer ran without CUDA graphs"
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-6)
    for got, want in zip(got_params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    moved = sum(int(not torch.equal(p, q)) for p, q in zip(got_params, _initial_params(overrides)))
    assert moved == len(got_params)


def _initial_params(overrides: dict) -> list[torch.Tensor]:
    model = tiny_model("llama")
    inject_mixlora(model, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4,
                                        target_modules=targets_for("llama"), **overrides))
    randomize_adapter(model, std=0.05)
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]
