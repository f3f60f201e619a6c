"""Against PEFT: one expert with top-1 is plain LoRA; LoRA/DoRA baselines load in PEFT."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from mixlora_ds import MixLoraConfig, inject_mixlora, load_mixlora_adapter, save_mixlora_adapter
from tests.core.tiny_models import VOCAB, randomize_adapter, tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(state_dict, use_dora=False):
    base = tiny_model("llama", state_dict=state_dict)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=use_dora)
    return get_peft_model(base, cfg)


def test_one_expert_top1_equals_peft_lora():
    base = tiny_model("llama")
    ours = tiny_model("llama", state_dict=base.state_dict())
    inject_mixlora(ours, MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=1, top_k=1,
                                       target_modules=TARGETS))
    randomize_adapter(ours)
    peft = _peft_model(base.state_dict())
    ours_params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" not in name:
                continue
            # base_model.model.model.layers.0.mlp.gate_proj.lora_A.default.weight
            tail = name.replace("base_model.model.", "", 1).replace(".default", "")
            if ".mlp." in tail:
                layer, proj, kind = tail.split(".mlp.")[0], tail.split(".")[4], tail.split(".")[5]
                p.copy_(ours_params[f"{layer}.mlp.experts.{proj}.{kind}"][0])
            else:
                p.copy_(ours_params[tail])
            copied += 1
    assert copied == 2 * 7 * 2
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    ours.eval(), peft.eval()
    with torch.no_grad():
        assert (ours(ids).logits - peft(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_baseline_saves_in_peft_layout(use_dora, tmp_path):
    base = tiny_model("llama")
    ours = tiny_model("llama", state_dict=base.state_dict())
    inject_mixlora(ours, MixLoraConfig(peft_type="LORA", r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora,
                                       target_modules=TARGETS))
    randomize_adapter(ours)
    ours.eval()
    save_mixlora_adapter(ours, tmp_path)
    peft = PeftModel.from_pretrained(tiny_model("llama", state_dict=base.state_dict()), str(tmp_path)).eval()
    reloaded = load_mixlora_adapter(tiny_model("llama", state_dict=base.state_dict()), tmp_path).eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids).logits
        assert (peft(ids).logits - expected).abs().max().item() <= 1e-5
        assert (reloaded(ids).logits - expected).abs().max().item() <= 1e-6


def test_peft_saved_adapter_loads_here(tmp_path):
    base = tiny_model("llama")
    peft = _peft_model(base.state_dict(), use_dora=True)
    randomize_adapter(peft)
    peft.eval()
    peft.save_pretrained(str(tmp_path))
    ours = load_mixlora_adapter(tiny_model("llama", state_dict=base.state_dict()), tmp_path).eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - peft(ids).logits).abs().max().item() <= 1e-5
