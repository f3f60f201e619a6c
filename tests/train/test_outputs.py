"""What a finished run leaves behind: TensorBoard scalars/images, checkpoints, and an adapter that the
reference ``mixlora`` package loads with the same logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.train.conftest import MIXLORA, TINY_MODEL

MIXLORA_SWITCH = dict(MIXLORA, routing_strategy="mixlora-switch", top_k=1, expert_capacity=4)

pytestmark = pytest.mark.distributed


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_tags_present_and_finite(reference_run):
    acc = scalars(reference_run.out_dir)
    tags = set(acc.Tags()["scalars"])
    required = {"train/loss", "train/ce_loss", "train/aux_loss", "train/lr", "train/grad_norm",
                "perf/tokens_per_s", "perf/tflops", "perf/mfu", "perf/peak_mem_gb", "eval/loss"}
    required |= {f"train/task_loss/{t}" for t in ("arc-e", "boolq", "obqa")}
    layers, experts = TINY_MODEL["num_hidden_layers"], 4
    for i in range(layers):
        required.add(f"moe/layer_{i}/router_entropy")
        required |= {f"moe/layer_{i}/expert_{e}_load" for e in range(experts)}
    missing = required - tags
    assert not missing, sorted(missing)
    for tag in required:
        events = acc.Scalars(tag)
        assert events, tag
        assert all(math.isfinite(e.value) for e in events), tag
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    # Loads per layer are fractions of the routed slots; the entropy is at most log(E).
    for i in range(layers):
        for step in range(1, 9):
            total = sum(acc.Scalars(f"moe/layer_{i}/expert_{e}_load")[step - 1].value for e in range(experts))
            assert abs(total - 1.0) < 1e-5
        assert all(0 < e.value <= math.log(experts) + 1e-6 for e in acc.Scalars(f"moe/layer_{i}/router_entropy"))
    # tokens_dropped exists for switch routing only.
    assert not any(t.endswith("tokens_dropped") for t in tags)
    images = acc.Tags()["images"]
    assert "moe/expert_load" in images
    assert [e.step for e in acc.Images("moe/expert_load")] == [4, 8]


def test_checkpoints_complete_pruned_and_described(reference_run):
    root = reference_run.out_dir / "checkpoints"
    tags = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert tags == ["step_00000004", "step_00000008"]  # every 4 steps, keep_last 2
    for tag in tags:
        d = root / tag
        meta = json.loads((d / "complete.json").read_text())
        assert meta["world_size"] == 2 and meta["step"] == int(tag.split("_")[1])
        assert (d / "rank_00000.pt").is_file() and (d / "rank_00001.pt").is_file()
        assert "zero_optimization" in json.loads((d / "ds_config.json").read_text())
        assert "adapter:" in (d / "run_config.yaml").read_text()
    assert (root / "latest").read_text().strip() == "step_00000008"
    # Only trainable tensors were saved: far smaller than the base model.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag="step_00000008", exclude_frozen_parameters=True)
    assert sd and all(".lora_" in k or ".router." in k for k in sd), sorted(sd)[:5]


def _reference_model(base_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    from tests.reference_oracle import attach_reference_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    return attach_reference_adapter(model, adapter_dir)


def test_exported_adapter_gives_reference_logits(dropout_run, assets, tmp_path):
    from transformers import AutoModelForCausalLM

    from mixlora_ds import load_mixlora_adapter

    adapter = dropout_run.out_dir / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MIXLORA" and cfg["act_fn"] == "silu" and cfg["lora_dropout"] > 0
    ours = AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32, attn_implementation="eager")
    load_mixlora_adapter(ours, adapter)
    ours.eval()
    ref = _reference_model(str(assets.base), adapter)
    ids = torch.randint(3, TINY_MODEL["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
        base = AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32)(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - base).abs().max().item() > 1e-3, "the trained adapter changes nothing"


def test_switch_routing_logs_dropped_tokens(assets, runs_root):
    """Top-1 routing with a small capacity drops tokens; the per-layer count reaches TensorBoard."""
    from tests.train.conftest import assert_ok, run_config, run_training, write_config

    out = runs_root / "switch"
    adapter = dict(MIXLORA_SWITCH)
    cfg = run_config(assets, out, max_steps=2, checkpoint__every_steps=0, eval__every_steps=0, eval__at_end=False,
                     adapter=adapter)
    result = run_training(2, write_config(cfg, runs_root / "switch.yaml"), out)
    assert_ok(result)
    acc = scalars(out)
    for i in range(TINY_MODEL["num_hidden_layers"]):
        dropped = acc.Scalars(f"moe/layer_{i}/tokens_dropped")
        assert len(dropped) == 2 and all(math.isfinite(e.value) for e in dropped)
        assert any(e.value > 0 for e in dropped), "capacity 4 per sequence must drop tokens"
