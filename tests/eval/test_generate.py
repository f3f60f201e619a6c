"""Generation: KV cache against step-by-step decoding, batching, sampling seeds."""

from __future__ import annotations

import pytest
import torch

from mixlora_ds.data.prompt_batch import encode_prompt
from mixlora_ds.inference import generate, generate_ids, load_for_inference

PROMPTS = [
    "Please answer the following question with true or false: is the sun warm?\nAnswer:",
    "Please choose the correct answer to the question: which? (A) red (B) blue\nAnswer:",
    "fish",
]


def stepwise_greedy(model, ids: list[int], n: int, eos_id: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step (no cache)."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            if nxt == eos_id:
                break
            seq.append(nxt)
    return seq[len(ids):]


@pytest.mark.parametrize("adapter", ["mixlora_dir", "lora_dir", "dora_dir"])
def test_kv_cache_generation_equals_stepwise_decode(adapter, request, base_dir, tokenizer):
    model, _ = load_for_inference(base_dir, adapter=request.getfixturevalue(adapter), dtype="float32", device="cpu")
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        want = stepwise_greedy(model, ids, 12, tokenizer.eos_token_id)
        cached = generate_ids(model, [ids], pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                              max_new_tokens=12, use_cache=True)[0]
        assert cached == want, prompt
        assert len(want) > 0


def test_adapter_changes_generation(base_dir, mixlora_dir, tokenizer):
    base, _ = load_for_inference(base_dir, dtype="float32", device="cpu")
    tuned, _ = load_for_inference(base_dir, adapter=mixlora_dir, dtype="float32", device="cpu")
    a = generate(base, tokenizer, PROMPTS, max_new_tokens=10)
    b = generate(tuned, tokenizer, PROMPTS, max_new_tokens=10)
    assert a != b


def test_batched_left_padded_generation_equals_single(mixlora_model, tokenizer):
    together = generate(mixlora_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    alone = [generate(mixlora_model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert together == alone
    no_cache = generate(mixlora_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3, use_cache=False)
    assert no_cache == together
    static = generate(mixlora_model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3,
                      cache_implementation="static")
    assert static == together


def test_merged_and_unmerged_adapters_generate_alike(base_dir, mixlora_dir, dora_dir, tokenizer):
    for adapter in (mixlora_dir, dora_dir):
        merged, _ = load_for_inference(base_dir, adapter=adapter, dtype="float32", device="cpu")
        unmerged, _ = load_for_inference(base_dir, adapter=adapter, dtype="float32", device="cpu", merge_lora=False)
        assert getattr(merged, "mixlora_merged", False) and not getattr(unmerged, "mixlora_merged", False)
        assert generate(merged, tokenizer, PROMPTS, max_new_tokens=10) == generate(unmerged, tokenizer, PROMPTS,
                                                                                   max_new_tokens=10)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(mixlora_model, tokenizer):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, top_k=50)
    a = generate(mixlora_model, tokenizer, PROMPTS, seed=1, **kw)
    b = generate(mixlora_model, tokenizer, PROMPTS, seed=1, **kw)
    assert a == b
    others = [generate(mixlora_model, tokenizer, PROMPTS, seed=s, **kw) for s in (2, 3, 4)]
    assert any(o != a for o in others)
    assert torch.equal(torch.get_rng_state(), state)


def test_generate_cli_matches_api(base_dir, mixlora_dir, tokenizer, mixlora_model, tmp_path):
    import json
    import subprocess
    import sys

    from .conftest import REPO

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(p.replace("\n", "\\n") for p in PROMPTS[1:]) + "\n")
    out = tmp_path / "gen.jsonl"
    cmd = [sys.executable, str(REPO / "launch/generate.py"), "--base-model", str(base_dir), "--adapter", str(mixlora_dir),
           "--prompt", PROMPTS[0].replace("\n", "\\n"), "--prompts-file", str(prompts_file), "--max-new-tokens", "8",
           "--dtype", "float32", "--device", "cpu", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == generate(mixlora_model, tokenizer, PROMPTS, max_new_tokens=8)


def test_no_progress_hides_the_model_loading_bars(base_dir, mixlora_dir, tmp_path):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    def stderr_of(*flags: str) -> str:
        cmd = [sys.executable, str(REPO / "launch/generate.py"), "--base-model", str(base_dir), "--adapter",
               str(mixlora_dir), "--prompt", "Hi", "--max-new-tokens", "2", "--dtype", "float32", "--device", "cpu",
               "--output", str(tmp_path / "gen.jsonl"), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "Loading weights" in stderr_of()  # transformers draws it by default
    assert "Loading weights" not in stderr_of("--no-progress")


def test_a_run_file_given_as_model_config_names_its_bad_line(tmp_path):
    import pytest

    from mixlora_ds.model.presets import run_model_config

    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  config: {model_type: llama\n  other: [\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: invalid YAML"):
        run_model_config(bad)
