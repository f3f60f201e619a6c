"""Scoring building blocks: padding, label tokens, known-answer accuracy, log-likelihoods."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mixlora_ds.data.prompt_batch import encode_prompt, pad_batch
from mixlora_ds.data.templates import TASKS
from mixlora_ds.eval import EvalOptions, evaluate_task, load_task
from mixlora_ds.eval.scoring import (
    continuation_logprobs,
    label_context_mismatches,
    label_token_ids,
    last_token_logits,
    split_continuation,
)
from mixlora_ds.model.presets import build_model_from_config

from .conftest import make_tokenizer, task_records, tiny_config, write_jsonl


def test_pad_batch_positions_and_last_index_both_sides():
    seqs = [[5, 6, 7], [8], [9, 10]]
    left = pad_batch(seqs, pad_id=0, side="left")
    right = pad_batch(seqs, pad_id=0, side="right")
    assert left.input_ids_BS.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert right.input_ids_BS.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert left.last_index_B.tolist() == [2, 2, 2]
    assert right.last_index_B.tolist() == [2, 0, 1]
    # Real tokens are numbered from 0 on either side.
    for b, s in enumerate(seqs):
        for batch in (left, right):
            real = batch.attention_mask_BS[b].bool()
            assert batch.position_ids_BS[b][real].tolist() == list(range(len(s)))
            assert batch.input_ids_BS[b][real].tolist() == s
    with pytest.raises(ValueError, match="empty"):
        pad_batch([[1], []], pad_id=0)


@pytest.mark.parametrize("style", ["metaspace", "bytelevel"])
def test_label_token_is_the_token_that_follows_the_prompt(style, tmp_path):
    """With a space-prefix (SentencePiece-like) tokenizer and with a byte-level one that has no
    prefix space, the label token is the one the training text puts right after "Answer:"."""
    tok = make_tokenizer(style, tmp_path)
    labels = ["1", "2", "3", "4", "A", "B", "C", "D", "E"]
    ids = label_token_ids(tok, labels)
    rec = task_records("arc-e", 1)[0]
    prompt = TASKS["arc-e"].build_prompt(rec)
    ctx = encode_prompt(tok, prompt)
    for label, label_id in zip(labels, ids):
        whole = encode_prompt(tok, prompt + " " + label)
        assert whole[: len(ctx)] == ctx
        assert whole[len(ctx)] == label_id, (style, label, tok.convert_ids_to_tokens(whole[len(ctx) :]))
    assert label_context_mismatches(tok, labels, ids, prompt) == []
    plain = [tok.encode(lab, add_special_tokens=False)[-1] for lab in labels]
    if style == "bytelevel":
        # Without the leading space the byte-level tokenizer gives the mid-word token: the wrong one.
        assert plain != ids
    else:
        # The space-prefix tokenizer marks the word start itself: both spellings agree.
        assert plain == ids


def test_label_collision_and_split_labels_are_reported(tokenizer):
    with pytest.raises(ValueError, match="same token id"):
        label_token_ids(tokenizer, ["A", "A"])
    # A label the vocabulary has never seen is several pieces: the context check flags it.
    labels = ["A", "zqxj"]
    ids = label_token_ids(tokenizer, labels)
    assert label_context_mismatches(tokenizer, labels, ids, "Question?\nAnswer:") == ["zqxj"]


def _head_model(tokenizer, bias_by_token: dict[int, float]):
    """A tiny model whose output head ignores the hidden state: logits = a fixed bias vector."""
    model = build_model_from_config(tiny_config(tokenizer), seed=3).eval()
    V = model.config.vocab_size
    head = nn.Linear(model.config.hidden_size, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for tok_id, value in bias_by_token.items():
            head.bias[tok_id] = value
    model.lm_head = head
    return model


def test_known_answer_accuracy_reference_and_per_record(tokenizer, tmp_path):
    """ARC with a head that always prefers "E", then "B": the reference scores over all nine labels
    (so 4-choice questions get "E", always wrong); per-record labels fall back to "B"."""
    recs = task_records("arc-e", 40, seed=5)
    path = write_jsonl(tmp_path / "arc.jsonl", recs)
    e_id, b_id = label_token_ids(tokenizer, ["E", "B"])
    model = _head_model(tokenizer, {e_id: 5.0, b_id: 3.0})
    opts = EvalOptions(batch_size=7, progress=False)

    ref = evaluate_task(model, tokenizer, load_task("arc-e", path), opts)
    expected_ref = sum(r["answerKey"] == "E" for r in recs)
    assert ref.correct == expected_ref and ref.n == 40
    assert ref.predictions == ["E"] * 40

    fixed = evaluate_task(model, tokenizer, load_task("arc-e", path, per_record_labels=True), opts)
    want = ["E" if "E" in r["choices"]["label"] else "B" if "B" in r["choices"]["label"] else r["choices"]["label"][0]
            for r in recs]
    assert fixed.predictions == want
    assert fixed.correct == sum(w == r["answerKey"] for w, r in zip(want, recs))
    assert fixed.accuracy == pytest.approx(fixed.correct / 40)


def test_known_answer_boolq_true_head(tokenizer, tmp_path):
    recs = task_records("boolq", 30, seed=2)
    path = write_jsonl(tmp_path / "boolq.jsonl", recs)
    (true_id,) = label_token_ids(tokenizer, ["true"])
    model = _head_model(tokenizer, {true_id: 4.0})
    res = evaluate_task(model, tokenizer, load_task("boolq", path), EvalOptions(batch_size=4, progress=False))
    assert res.correct == sum(r["answer"] is True for r in recs)
    assert 0 < res.correct < 30  # the data has both answers, so the check means something


def test_last_token_logits_match_unbatched_forward(mixlora_model, tokenizer):
    prompts = ["Please answer: is it?\nAnswer:", "short", "a much longer prompt with many many words in it\nAnswer:"]
    seqs = [encode_prompt(tokenizer, p) for p in prompts]
    singles = []
    with torch.inference_mode():
        for s in seqs:
            singles.append(mixlora_model(input_ids=torch.tensor([s])).logits[0, -1].float())
        for side in ("left", "right"):
            got = last_token_logits(mixlora_model, pad_batch(seqs, tokenizer.pad_token_id, side))
            for b in range(len(seqs)):
                torch.testing.assert_close(got[b], singles[b], atol=2e-5, rtol=1e-5)


def test_continuation_logprobs_match_direct_sum(mixlora_model, tokenizer):
    prompt = "Please choose the correct answer to the question: which? (A) red (B) blue\nAnswer:"
    conts = [" red", " blue stone", " A"]
    pairs = [split_continuation(tokenizer, prompt, c) for c in conts]
    with torch.inference_mode():
        direct = []
        for ids, n in pairs:
            logp = torch.log_softmax(mixlora_model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            direct.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))))
        for side in ("left", "right"):
            batch = pad_batch([ids for ids, _ in pairs], tokenizer.pad_token_id, side)
            got = continuation_logprobs(mixlora_model, batch, torch.tensor([n for _, n in pairs]))
            torch.testing.assert_close(got, torch.tensor(direct), atol=1e-4, rtol=1e-5)


def test_prompts_start_with_the_tokenizers_own_prefix_and_never_end_with_eos(tmp_path, project_tok_dir):
    from tokenizers import processors

    from mixlora_ds.data.tokenizer_io import load_tokenizer

    text = "Please answer: is it?\nAnswer:"
    llama_like = load_tokenizer(project_tok_dir)  # adds BOS by itself, like LLaMA's
    bare = llama_like.encode(text, add_special_tokens=False)
    assert encode_prompt(llama_like, text) == [llama_like.bos_token_id] + bare
    assert encode_prompt(llama_like, text, add_bos=False) == bare

    tok = make_tokenizer("metaspace", tmp_path)  # defines <s> but adds nothing (GPT-2 style)
    bare = tok.encode(text, add_special_tokens=False)
    assert encode_prompt(tok, text) == bare
    # A tokenizer that wraps every text in <s> ... </s>: the prompt keeps <s> and drops </s>.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    assert tok.encode(text)[-1] == tok.eos_token_id
    assert encode_prompt(tok, text) == [tok.bos_token_id] + bare
