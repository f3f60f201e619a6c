"""A single-process, plain PyTorch re-statement of one training run: the oracle for distributed runs.

No DeepSpeed, no sharding, no gradient accumulation machinery: the global batch of each step is
the rows the data-parallel ranks would read together, and the loss is written out directly as the
design states it (CE summed over answer tokens / answer tokens of the global batch, plus the mean
aux loss of the step's forwards). Optimizer, clipping and schedule are torch's own, with the
schedule written here from its definition.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def lr_factor(step: int, kind: str, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * shape


def oracle_run(cfg: dict[str, Any], export_dir: Path | None = None) -> list[float]:
    """Train as ``cfg`` (a run-config dict, micro-batch 1) describes; returns the loss per step."""
    from transformers import AutoModelForCausalLM

    from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter
    from mixlora_ds.data.reader import PackedDataset, ResumableDistributedSampler, collate_packed
    from mixlora_ds.model.aux_loss import mixlora_aux_loss

    assert cfg["batch"]["micro_batch_size"] == 1, "the oracle groups rows one per forward"
    G = cfg["batch"]["global_batch_size"]
    steps = cfg["max_steps"]
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]["name_or_path"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    torch.manual_seed(cfg["seed"])
    inject_mixlora(model, MixLoraConfig(**cfg["adapter"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg["optim"]
    opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"], betas=(0.9, 0.999), eps=1e-8)
    s = cfg["schedule"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k, s["type"], s["warmup_steps"], steps, s["min_lr_ratio"]))

    ds = PackedDataset(cfg["data"]["train_dir"], split="train")
    order = ResumableDistributedSampler(ds, 0, 1, seed=cfg["seed"], shuffle=True).epoch_order(0)
    assert steps * G <= len(order), "the oracle covers one epoch"
    is_moe = cfg["adapter"]["peft_type"] == "MIXLORA"
    losses = []
    for step in range(steps):
        batches = [collate_packed([ds[int(i)]]) for i in order[step * G:(step + 1) * G]]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           position_ids=b["position_ids"]).logits
            vocab = logits.shape[-1]
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), b["labels"][:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum")
            aux = mixlora_aux_loss(model, attention_mask=(b["task_ids"] >= 0).float()) if is_moe else 0.0
            loss = ce / n_tokens + aux / G
            loss.backward()
            total += float(loss.detach())
        if o["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, o["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    if export_dir is not None:
        save_mixlora_adapter(model, export_dir)
    return losses
