"""Micro-batches of packed rows for one rank, and the per-token loss terms computed on them.

Shape legend: B rows in a micro-batch, S row length, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import torch
import torch.nn.functional as F

IGNORE = -100


class BatchStream:
    """Endless micro-batches for this rank, epoch after epoch, with a resumable position."""

    def __init__(self, data_dir: str, split: str, micro: int, seed: int, shuffle: bool, drop_last: bool,
                 rank: int, world: int, dense_mask: bool = True):
        from mixlora_ds.data.reader import PackedDataset, ResumableDistributedSampler, collate_packed

        self.dataset = PackedDataset(data_dir, split=split)
        self.sampler = ResumableDistributedSampler(self.dataset, rank=rank, world_size=world, seed=seed,
                                                   shuffle=shuffle, drop_last=drop_last)
        # The [B, 1, S, S] block mask is for SDPA/eager; flash attention reads position ids instead.
        self.collate = functools.partial(collate_packed, attention_mask=dense_mask)
        self.micro = micro
        self.epoch = 0
        self._it: Iterator[int] | None = None

    def micro_batches_per_epoch(self) -> int:
        return len(self.sampler) // self.micro

    def next(self) -> dict[str, Any]:
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self._it = iter(self.sampler)
            idx = []
            for i in self._it:
                idx.append(i)
                if len(idx) == self.micro:
                    return self.collate([self.dataset[j] for j in idx])
            # Epoch over (a short tail that cannot fill a micro-batch is skipped on every rank).
            self.epoch += 1
            self._it = None

    def state_dict(self) -> dict[str, Any]:
        # Called between steps, when every index pulled from the sampler has been trained on.
        return self.sampler.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sampler.load_state_dict(sd)
        self.epoch = self.sampler.epoch
        self._it = None


def model_inputs(batch: dict[str, Any], attn_impl: str, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Forward kwargs: packed sequences stay separate through position ids + a block mask.

    flash attention reads sequence boundaries from position ids (varlen); sdpa takes the boolean
    block-diagonal mask as is; eager needs it additive.
    """
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device)}
    if not attn_impl.startswith("flash"):
        mask = batch["attention_mask"].to(device)
        if attn_impl == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
        inputs["attention_mask"] = mask
    return inputs


def real_token_mask(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """[B, S] 1.0 for tokens of real examples, 0.0 for padding (router statistics count these)."""
    return (batch["task_ids"] >= 0).to(device=device, dtype=torch.float32)


def answer_token_count(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_ce(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Per-position CE of next-token prediction (0 where ignored), [B, S-1], in fp32."""
    logits = logits_BSV[:, :-1].float()
    targets = labels_BS[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                         reduction="none")
    return ce.view(targets.shape)
