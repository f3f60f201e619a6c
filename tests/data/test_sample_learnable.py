"""The sample set is learnable: a tiny randomly initialised LLaMA trained for three epochs on the
prepared train split (through PackedDataset, the sampler and collate_packed, loss on answer
tokens only) beats chance clearly on the held-out eval records, scored the reference's way
(next-token logits of the label tokens after the prompt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_prep.build_tokenizer import build_tokenizer
from mixlora_ds.data.reader import (IGNORE_INDEX, PackedDataset, ResumableDistributedSampler,
                                    collate_packed)
from mixlora_ds.data.templates import TASKS

from tests.data.conftest import run_prepare


@pytest.fixture(scope="module")
def trained(sample, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("learn")
    # A vocabulary large enough for the labels (" true", " A") to be single tokens, as in LLaMA.
    tok_dir = build_tokenizer([str(sample["dir"])], root / "tok", 1000, num_threads=1)
    assert run_prepare("--mixture", sample["dir"] / "mixture.yaml", "--tokenizer", tok_dir,
                       "--seq-len", 256, "--out", root / "prepared") == 0
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ds = PackedDataset(root / "prepared", "train")
    sampler = ResumableDistributedSampler(ds, 0, 1, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for b in DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=collate_packed):
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                           attention_mask=b["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), tok


def accuracy(model, tok, task: str, path) -> tuple[float, float]:
    """(accuracy, chance) over a task's eval file, argmax over the record's label tokens."""
    spec = TASKS[task]
    right, chance = 0, 0.0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for rec in records:
        labels = spec.choice_labels(rec)
        label_ids = [tok.encode(" " + lab, add_special_tokens=False)[-1] for lab in labels]
        assert len(set(label_ids)) == len(labels)  # each label a distinct token
        ids = tok(spec.build_prompt(rec), return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        pred = labels[int(torch.argmax(logits[label_ids]))]
        right += pred == spec.answer_label(rec)
        chance += 1 / len(labels)
    return right / len(records), chance / len(records)


def test_tiny_model_learns_the_sample_tasks(trained, sample):
    model, tok = trained
    acc, chance = {}, {}
    for task in TASKS:
        acc[task], chance[task] = accuracy(model, tok, task, sample["paths"][task]["eval"])
    gain = {t: acc[t] - chance[t] for t in TASKS}
    assert np.mean(list(gain.values())) > 0.3, acc
    assert sum(g > 0.25 for g in gain.values()) >= 5, acc
