"""Turn prompts into scores: label tokens, truncation, label-logit and log-likelihood scoring.

Shape legend: B batch rows, S padded sequence length, V vocabulary, L candidate labels.

Label-logit scoring is the reference's (``reference-mixlora.md`` §7.3): the next-token logits at the
last prompt position, restricted to the label tokens, argmax. A label's token is the LAST id of
``tokenizer.encode(" " + label)``: the leading space makes the label a word of its own, which is how it
follows "Answer:" in the training text, whether the tokenizer marks word starts by a space prefix
(SentencePiece "▁A") or inside the token (byte-level BPE "ĠA").

Batches (``mixlora_ds.data.prompt_batch``) may be padded on either side: the model gets their position
ids, derived from the attention mask, and the last real position of every row is gathered explicitly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mixlora_ds.data.prompt_batch import PaddedBatch, encode_prompt


# ------------------------------------------------------------------------------------ tokenising
def truncate(ids: list[int], max_length: int, side: str) -> list[int]:
    """Cut to ``max_length``. "right" keeps the start (the reference; it can cut "Answer:");
    "left" keeps the end, which keeps the question's tail and "Answer:" (corrected)."""
    if len(ids) <= max_length:
        return ids
    if side == "right":
        return ids[:max_length]
    if side == "left":
        return ids[len(ids) - max_length :]
    raise ValueError(f"truncation side must be 'left' or 'right', got {side!r}")


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The reference's label token per label: last id of ``encode(" " + label)``.

    Raises when two labels map to one token: the argmax could never tell them apart.
    """
    ids: list[int] = []
    for label in labels:
        enc = tokenizer.encode(" " + label, add_special_tokens=False)
        if not enc:
            raise ValueError(f"label {label!r} encodes to no token")
        ids.append(enc[-1])
    seen: dict[int, str] = {}
    for label, i in zip(labels, ids):
        if i in seen:
            raise ValueError(
                f"labels {seen[i]!r} and {label!r} map to the same token id {i}; label-logit scoring cannot "
                "distinguish them (use log-likelihood scoring or a tokenizer with a larger vocabulary)"
            )
        seen[i] = label
    return ids


def label_context_mismatches(tokenizer, labels: Sequence[str], label_ids: Sequence[int], prompt: str) -> list[str]:
    """Labels whose token does not directly follow ``prompt`` in ``prompt + " " + label``.

    That happens with small vocabularies where " A" is two tokens (a lone space token, then "A"):
    the model's next token after "Answer:" is then the space for every label, and label-logit
    scoring reads the wrong position. Log-likelihood scoring is unaffected.
    """
    ctx = encode_prompt(tokenizer, prompt, add_bos=False)
    bad = []
    for label, label_id in zip(labels, label_ids):
        whole = encode_prompt(tokenizer, prompt + " " + label, add_bos=False)
        if whole[: len(ctx)] != ctx or len(whole) != len(ctx) + 1 or whole[-1] != label_id:
            bad.append(label)
    return bad


# ---------------------------------------------------------------------------------- model calls
def _forward(model, batch: PaddedBatch, logits_to_keep: int = 0) -> torch.Tensor:
    kwargs = {}
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(
        input_ids=batch.input_ids_BS,
        attention_mask=batch.attention_mask_BS,
        position_ids=batch.position_ids_BS,
        use_cache=False,
        **kwargs,
    )
    return out.logits


def last_token_logits(model, batch: PaddedBatch) -> torch.Tensor:
    """fp32 next-token logits [B, V] at each row's last real position."""
    S = batch.input_ids_BS.shape[1]
    if bool((batch.last_index_B == S - 1).all()):
        # Every row ends at the last column (left padding, or equal lengths): the LM head needs to run
        # on that one column only.
        return _forward(model, batch, logits_to_keep=1)[:, -1].float()
    logits_BSV = _forward(model, batch)
    rows_B = torch.arange(logits_BSV.shape[0], device=logits_BSV.device)
    return logits_BSV[rows_B, batch.last_index_B.to(logits_BSV.device)].float()


def pick_labels(logits_BV: torch.Tensor, label_ids_L: torch.Tensor, allowed_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Index (into the label list) of the highest-scoring allowed label per row. Ties go to the first
    label, as torch.argmax resolves them, so the result is deterministic."""
    scores_BL = logits_BV[:, label_ids_L.to(logits_BV.device)]
    if allowed_BL is not None:
        scores_BL = scores_BL.masked_fill(~allowed_BL.to(scores_BL.device), float("-inf"))
    return scores_BL.argmax(-1)


def continuation_logprobs(model, batch: PaddedBatch, cont_lens_B: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over the last ``cont_lens_B[b]`` real tokens of each row (fp32, [B])."""
    logits_BSV = _forward(model, batch)
    out = torch.empty(logits_BSV.shape[0], dtype=torch.float32)
    ids_BS = batch.input_ids_BS.to(logits_BSV.device)
    for b in range(logits_BSV.shape[0]):
        end = int(batch.last_index_B[b])  # last real token
        n = int(cont_lens_B[b])
        # Token t is predicted from position t-1.
        pred_positions = torch.arange(end - n, end, device=logits_BSV.device)
        logp_NV = F.log_softmax(logits_BSV[b, pred_positions].float(), dim=-1)
        targets_N = ids_BS[b, pred_positions + 1]
        out[b] = logp_NV.gather(-1, targets_N[:, None]).sum().cpu()
    return out


def split_continuation(tokenizer, prompt: str, continuation: str, *, add_bos: bool = True) -> tuple[list[int], int]:
    """Ids of ``prompt + continuation`` and how many of the trailing ids belong to the continuation.

    The whole string is tokenised at once (as the model saw it in training) and the prompt's own
    encoding is taken off the front; if the two disagree at the boundary (a merge across it), the
    continuation is encoded on its own and appended.
    """
    ctx = encode_prompt(tokenizer, prompt, add_bos=add_bos)
    whole = encode_prompt(tokenizer, prompt + continuation, add_bos=add_bos)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return whole, len(whole) - len(ctx)
    cont = list(tokenizer.encode(continuation, add_special_tokens=False))
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no token")
    return ctx + cont, len(cont)
