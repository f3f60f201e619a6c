"""Run under torchrun by test_expert_parallel.py: expert parallelism against one process.

Each rank builds the same tiny model (same seed), keeps a whole copy as the single-process
reference, installs expert parallelism on the other, and runs its own slice of a global batch.
The reference runs every slice on the full model. Compared, per case: the logits of this rank's
slice, the loss, and every adapter gradient summed over ranks (experts gathered from their owners).
Writes OUT_DIR/ep_rank<r>.json: {case: {"logits": diff, "loss": diff, "grads": diff, ...}}.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as tdist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mixlora_ds import MixLoraConfig, inject_mixlora  # noqa: E402
from mixlora_ds.model.aux_loss import mixlora_aux_loss  # noqa: E402
from mixlora_ds.model.experts import is_expert_param  # noqa: E402
from mixlora_ds.model.moe import moe_blocks, set_compute_path  # noqa: E402
from mixlora_ds.parallel.expert_parallel import ExpertParallel  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
ROWS, SEQ = 2, 12  # per rank

CASES = {
    "topk": dict(adapter=dict(routing_strategy="mixlora", top_k=2)),
    "top1": dict(adapter=dict(routing_strategy="mixlora", top_k=1)),
    "topk_grouped": dict(adapter=dict(routing_strategy="mixlora", top_k=2), path="grouped"),
    "topk_loop": dict(adapter=dict(routing_strategy="mixlora", top_k=3), path="loop"),
    "top_p": dict(adapter=dict(routing_strategy="mixlora-dynamic", top_p=0.6)),
    "switch": dict(adapter=dict(routing_strategy="mixlora-switch", expert_capacity=3, jitter_noise=0.0)),
    "dora": dict(adapter=dict(routing_strategy="mixlora", top_k=2, use_dora=True)),
    "padding": dict(adapter=dict(routing_strategy="mixlora", top_k=2), pad=5),
    # Every token picks experts 0 and 1, on EP rank 0: the other ranks' experts, and whole ranks, get none.
    "skewed": dict(adapter=dict(routing_strategy="mixlora", top_k=2), skew=True),
    "bias": dict(adapter=dict(routing_strategy="mixlora", top_k=2), model_type="qwen2"),
}


def build(case: dict, num_experts: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(case.get("model_type", "llama"), **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    if case.get("model_type") == "qwen2":  # give the FFN projections biases: the W2 fold's correction
        for layer in model.model.layers:
            for name in ("gate_proj", "up_proj", "down_proj"):
                old = getattr(layer.mlp, name)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
                with torch.no_grad():
                    new.weight.copy_(old.weight)
                    new.bias.normal_(0, 0.5)
                setattr(layer.mlp, name, new)
    adapter = dict(peft_type="MIXLORA", r=4, lora_alpha=8, lora_dropout=0.0, num_experts=num_experts,
                   target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], **case["adapter"])
    torch.manual_seed(1)
    inject_mixlora(model, MixLoraConfig(**adapter))
    with torch.no_grad():  # non-zero B everywhere, so every gradient and delta is non-trivial
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.normal_(0, 0.2)
    if "path" in case:
        set_compute_path(model, case["path"])
    model.train()
    return model


def batches(world: int, vocab: int, pad: int):
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, vocab, (world * ROWS, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        mask[1::2, -pad:] = 0  # right padding on every other row
    return ids, mask


def loss_of(model, ids, mask, n_tokens: int, world: int):
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = ids.masked_fill(mask == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="sum")
    return logits, ce / n_tokens + mixlora_aux_loss(model, attention_mask=mask) / world


def skew_router(model) -> None:
    """Every token picks experts 0 and 1: a large constant on their router logits."""
    from mixlora_ds.model.router import top_k_routing

    for block in moe_blocks(model):
        def forward(x_TD, seq_len=None, router=block.router):
            logits_TE = F.linear(x_TD.float(), router.weight.float())
            skew_E = torch.zeros(logits_TE.shape[-1])
            skew_E[:2] = 50.0
            return top_k_routing(logits_TE + skew_E, router.config.top_k)

        block.router.forward = forward


def run_case(name: str, case: dict, ep_size: int, num_experts: int) -> dict:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    reference = build(case, num_experts)
    model = copy.deepcopy(reference)
    ep = ExpertParallel.create(ep_size)
    ep.shard(model)
    if case.get("skew"):
        for m in (reference, model):
            skew_router(m)
    ids, mask = batches(world, TINY["vocab_size"], case.get("pad", 0))
    n_tokens = int(((ids.masked_fill(mask == 0, -100))[:, 1:] != -100).sum())
    mine = slice(rank * ROWS, (rank + 1) * ROWS)

    ref_logits_mine, ref_loss = None, 0.0
    for r in range(world):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        logits, loss = loss_of(reference, ids[rows], mask[rows], n_tokens, world)
        loss.backward()
        ref_loss += float(loss.detach())
        if r == rank:
            ref_logits_mine = logits.detach()
    logits, loss = loss_of(model, ids[mine], mask[mine], n_tokens, world)
    loss.backward()
    total = torch.tensor([float(loss.detach())], dtype=torch.float64)
    tdist.all_reduce(total)

    grad_diff, checked, zero_rows = 0.0, 0, False
    ref_params = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if is_expert_param(p):
            tdist.all_reduce(g, group=ep.edp_group)
            g = ep.gather_experts(g)
        else:
            tdist.all_reduce(g)
        ref = ref_params[n].grad if ref_params[n].grad is not None else torch.zeros_like(ref_params[n])
        assert g.shape == ref.shape, (n, g.shape, ref.shape)
        grad_diff = max(grad_diff, float((g - ref).abs().max()))
        checked += 1
    received = torch.tensor(ep.stats.received, dtype=torch.long)
    if case.get("skew"):
        zero_rows = bool((received == 0).all()) if ep.layout.ep_rank != 0 else False
    return {"logits": float((logits.detach() - ref_logits_mine).abs().max()),
            "loss": abs(float(total) - ref_loss), "grads": grad_diff, "checked": checked,
            "grad_scale": max(float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None),
            "received": received.tolist(), "zero_received": zero_rows}


def main() -> None:
    out_dir, ep_size, num_experts, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    tdist.init_process_group("gloo")
    torch.use_deterministic_algorithms(False)
    results = {name: run_case(name, CASES[name], ep_size, num_experts) for name in names}
    with open(os.path.join(out_dir, f"ep_rank{tdist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
