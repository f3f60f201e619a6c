"""The training-side reader: rank sharding, deterministic shuffling, resume, collation, and that
a packed row attends and predicts exactly like its examples run one by one."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mixlora_ds.data.reader import (IGNORE_INDEX, PackedDataset, ResumableDistributedSampler,
                                    collate_packed)


class Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def epoch_indices(n: int, world: int, epoch: int, **kw) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = ResumableDistributedSampler(Sized(n), rank, world, seed=3, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [30, 31, 32])
def test_every_sample_exactly_once_per_epoch(world, n):
    for epoch in range(3):
        per_rank = epoch_indices(n, world, epoch)
        flat = [i for r in per_rank for i in r]
        assert sorted(flat) == list(range(n))                       # exactly once
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert epoch_indices(n, world, 0) == epoch_indices(n, world, 0)  # deterministic
    assert epoch_indices(n, world, 0) != epoch_indices(n, world, 1)  # reshuffled per epoch


@pytest.mark.parametrize("world", [2, 3])
def test_drop_last_gives_equal_counts(world):
    per_rank = epoch_indices(31, world, 0, drop_last=True)
    assert len({len(r) for r in per_rank}) == 1
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == 31 - 31 % world


def test_no_shuffle_is_in_order():
    assert epoch_indices(7, 2, 5, shuffle=False) == [[0, 2, 4, 6], [1, 3, 5]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_mid_epoch_equals_uninterrupted(world):
    n, batch, epochs = 40, 2, 3
    # Uninterrupted: each rank's batches over three epochs.
    full = []
    for rank in range(world):
        s = ResumableDistributedSampler(Sized(n), rank, world, seed=11)
        order = []
        for e in range(epochs):
            s.set_epoch(e)
            order += list(s)
        full.append(order)
    # Interrupted after 5 batches of epoch 1 on every rank, state saved, fresh samplers resumed.
    resumed = []
    for rank in range(world):
        s = ResumableDistributedSampler(Sized(n), rank, world, seed=11)
        order = list(s)
        s.set_epoch(1)
        it = iter(s)
        order += [next(it) for _ in range(5 * batch)]
        state = s.state_dict()
        fresh = ResumableDistributedSampler(Sized(n), rank, world, seed=11)
        fresh.load_state_dict(state)
        for e in range(state["epoch"], epochs):
            fresh.set_epoch(e)
            order += list(fresh)
        resumed.append(order)
    assert resumed == full


def test_state_is_the_same_on_every_rank_and_allows_another_world_size():
    n = 50
    states, seen = [], []
    for rank in range(2):
        s = ResumableDistributedSampler(Sized(n), rank, 2, seed=5)
        s.set_epoch(2)
        it = iter(s)
        seen += [next(it) for _ in range(9)]
        states.append(s.state_dict())
    assert states[0] == states[1] and states[0]["position"] == 18
    # Resume on 3 ranks: the rest of epoch 2, each remaining row exactly once.
    rest = []
    for rank in range(3):
        s = ResumableDistributedSampler(Sized(n), rank, 3, seed=5)
        s.load_state_dict(states[0])
        s.set_epoch(2)
        rest += list(s)
    assert sorted(seen + rest) == list(range(n))


def test_state_at_end_of_epoch_and_mismatch_checks():
    s = ResumableDistributedSampler(Sized(10), 1, 3, seed=0)
    list(s)
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 0
    other = ResumableDistributedSampler(Sized(11), 0, 1, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        ResumableDistributedSampler(Sized(10), 3, 3)


def test_resume_through_a_dataloader(prepared):
    ds = PackedDataset(prepared, "train")

    def batches(sampler, k=None):
        loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_packed)
        out = []
        for b in loader:
            out.append(b["input_ids"])
            if k is not None and len(out) == k:
                break
        return out

    full = batches(ResumableDistributedSampler(ds, 0, 2, seed=1))
    s = ResumableDistributedSampler(ds, 0, 2, seed=1)
    head = batches(s, 7)
    fresh = ResumableDistributedSampler(ds, 0, 2, seed=1)
    fresh.load_state_dict(s.state_dict())
    tail = batches(fresh)
    assert len(head + tail) == len(full)
    for a, b in zip(head + tail, full):
        assert torch.equal(a, b)


def test_collate(prepared):
    ds = PackedDataset(prepared, "train")
    samples = [ds[0], ds[3], ds[len(ds) - 1]]
    b = collate_packed(samples)
    B, S = 3, ds.seq_len
    for key in ("input_ids", "labels", "position_ids", "task_ids"):
        assert b[key].shape == (B, S) and b[key].dtype == torch.long
    assert b["attention_mask"].shape == (B, 1, S, S) and b["attention_mask"].dtype == torch.bool
    assert b["cu_seqlens"].dtype == torch.int32 and int(b["cu_seqlens"][-1]) == B * S
    segs = torch.diff(b["cu_seqlens"]).tolist()
    assert b["max_seqlen"] == max(segs)
    # Reference mask built element by element from the segments.
    k = 0
    for row, s in enumerate(samples):
        lens = s["seq_lens"].tolist()
        assert b["seq_lens"][row] == lens
        pad = S - sum(lens)
        row_segs = lens + ([pad] if pad else [])
        assert segs[k:k + len(row_segs)] == row_segs
        k += len(row_segs)
        seg_of = np.repeat(np.arange(len(row_segs)), row_segs)
        ref = np.array([[seg_of[q] == seg_of[t] and t <= q for t in range(S)] for q in range(S)])
        assert np.array_equal(b["attention_mask"][row, 0].numpy(), ref)
        assert (b["labels"][row] == torch.from_numpy(s["labels"])).all()
    assert k == len(segs)
    assert "attention_mask" not in collate_packed(samples, attention_mask=False)


def test_sdpa_with_the_block_mask_equals_examples_alone(prepared):
    ds = PackedDataset(prepared, "train")
    b = collate_packed([ds[2]])
    S, H, D = ds.seq_len, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, generator=g) for _ in range(3))
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                              attn_mask=b["attention_mask"])
    assert torch.isfinite(packed).all()  # padding rows attend to themselves, never to nothing
    start = 0
    for L in b["seq_lens"][0]:
        sl = slice(start, start + L)
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl],
                                                                 v[:, :, sl], is_causal=True)
        torch.testing.assert_close(packed[:, :, sl], alone, rtol=1e-5, atol=1e-6)
        start += L


def test_packed_row_gives_the_logits_of_each_example_alone(prepared, tokenizer):
    """A tiny LLaMA on one packed row (position ids + block mask) predicts every example's
    tokens exactly as when the example is run by itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    ds = PackedDataset(prepared, "train")
    row = next(i for i in range(len(ds)) if len(ds[i]["seq_lens"]) >= 3)
    b = collate_packed([ds[row]])
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                       attention_mask=b["attention_mask"]).logits[0]
        start = 0
        for L in b["seq_lens"][0]:
            ids = b["input_ids"][:, start:start + L]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[start:start + L], alone, rtol=1e-4, atol=1e-4)
            start += L
    # Loss positions: only answer tokens and EOS, none at an example's first token.
    labels = b["labels"][0]
    starts = np.cumsum([0] + b["seq_lens"][0][:-1])
    assert all(labels[s] == IGNORE_INDEX for s in starts)
    tasks = Counter(b["task_ids"][0].tolist())
    assert sum(n for t, n in tasks.items() if t >= 0) == sum(b["seq_lens"][0])
