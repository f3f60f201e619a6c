"""MixLoraConfig: validation names the field; JSON round trip; legacy files."""

import json

import pytest

from mixlora_ds import MixLoraConfig, inject_mixlora
from mixlora_ds.config import ConfigError
from tests.core.tiny_models import tiny_model


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(routing_strategy="nope"), "routing_strategy"),
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(lora_alpha=16.5), "lora_alpha"),
        (dict(r=0), "'r'"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(peft_type="IA3"), "peft_type"),
        (dict(expert_lora={"rank": 4}), "expert_lora"),
        (dict(expert_lora={"lora_alpha": 3.0}), "expert_lora.lora_alpha"),
        (dict(top_p=0.0, routing_strategy="mixlora-dynamic"), "top_p"),
        (dict(task_type="SEQ_CLS"), "task_type"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MixLoraConfig(**kwargs)


def test_missing_and_unknown_fields_in_files(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "MIXLORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                "num_experts": 4}))
    with pytest.raises(ConfigError, match=r"adapter_config.json.*lora_dropout"):
        MixLoraConfig.from_json(path)
    path.write_text(json.dumps({"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj"],
                                "num_experts": 4, "num_expert": 3}))
    with pytest.raises(ConfigError, match="num_expert"):
        MixLoraConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="line 1"):
        MixLoraConfig.from_json(path)


def test_target_the_family_lacks():
    with pytest.raises(ConfigError, match="target_modules.*gate_up_proj"):
        inject_mixlora(tiny_model("llama"), MixLoraConfig(target_modules=["q_proj", "gate_up_proj"]))


def test_round_trip_keeps_router_hyperparameters(tmp_path):
    cfg = MixLoraConfig(r=16, lora_alpha=32, num_experts=8, top_k=2, router_aux_loss_coef=0.01,
                        jitter_noise=0.1, router_init_range=0.05, expert_lora={"r": 8, "lora_alpha": 16},
                        act_fn="silu", base_model_name_or_path="/models/llama")
    cfg.to_json(tmp_path / "a.json")
    back = MixLoraConfig.from_json(tmp_path / "a.json")
    assert back == cfg
    written = json.loads((tmp_path / "a.json").read_text())
    for key in ("router_aux_loss_coef", "jitter_noise", "router_init_range", "act_fn", "expert_lora"):
        assert key in written


def test_legacy_strategy_and_dict_targets(tmp_path):
    legacy = {"peft_type": "MIXLORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "routing_strategy": "mixtral",
              "num_experts": 8, "top_k": 2, "target_modules": {"q_proj": True, "k_proj": False, "gate_proj": True},
              "sparse_step": None, "act_fn": "silu"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(legacy))
    cfg = MixLoraConfig.from_json(tmp_path)
    assert cfg.routing_strategy == "mixlora"
    assert cfg.target_modules == ["q_proj", "gate_proj"]


def test_strategy_defaults():
    assert MixLoraConfig(routing_strategy="mixlora-switch").router_init_range == 1.0
    assert MixLoraConfig(routing_strategy="mixlora-switch").jitter_noise == 0.01
    assert MixLoraConfig().router_init_range == 0.02
    assert MixLoraConfig(r=16, lora_alpha=32, use_rslora=True).attention_settings().scaling == 32 / 4
    assert MixLoraConfig(r=16, lora_alpha=32, expert_lora={"lora_alpha": 64}).expert_settings().scaling == 4
