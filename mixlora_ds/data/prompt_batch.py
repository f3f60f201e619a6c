"""Prompts as model input: their token ids as training saw them, and padded batches of them.

Shared by scoring (``mixlora_ds.eval``) and generation (``mixlora_ds.inference``). Shape legend:
B batch rows, S padded sequence length.

Batches may be padded on either side. Position ids are derived from the attention mask, so a
left-padded row sees the same positions as the unpadded sequence; the last real position of every
row is recorded explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


# ------------------------------------------------------------------------------------ tokenising
def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text by itself (BOS for LLaMA, nothing for GPT-2).

    Training data is tokenised with the tokenizer's own special tokens, so prompts here start the
    same way; what it would append (an EOS, for some tokenizers) is left off: a prompt is followed
    by its answer, not by the end of the text.
    """
    probe = "x"
    bare = list(tokenizer.encode(probe, add_special_tokens=False))
    full = list(tokenizer.encode(probe, add_special_tokens=True))
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i]
    return []


def encode_prompt(tokenizer, text: str, *, add_bos: bool = True) -> list[int]:
    """Token ids of a prompt: the tokenizer's leading special tokens (``add_bos``) and no EOS, which is
    how the reference encodes prompts with LLaMA tokenizers (BOS, no EOS)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return special_prefix(tokenizer) + ids if add_bos else ids


# ------------------------------------------------------------------------------------- batching
@dataclass
class PaddedBatch:
    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    last_index_B: torch.Tensor
    """Position of each row's last real token."""
    first_index_B: torch.Tensor
    """Position of each row's first real token (its offset when padded on the left)."""

    def to(self, device: torch.device | str) -> "PaddedBatch":
        return PaddedBatch(*(t.to(device) for t in vars(self).values()))


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> PaddedBatch:
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("cannot batch an empty sequence")
    B, S = len(seqs), max(len(s) for s in seqs)
    input_ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((B, S), dtype=torch.long)
    first = torch.empty(B, dtype=torch.long)
    for b, s in enumerate(seqs):
        start = S - len(s) if side == "left" else 0
        input_ids_BS[b, start : start + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask_BS[b, start : start + len(s)] = 1
        first[b] = start
    lengths_B = mask_BS.sum(-1)
    # Real tokens count 0, 1, 2, ... from the row's first real token, whichever side the padding is.
    position_ids_BS = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(input_ids_BS, mask_BS, position_ids_BS, first + lengths_B - 1, first)
