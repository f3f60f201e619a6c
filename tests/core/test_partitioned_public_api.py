"""The public API on a model a user partitioned with DeepSpeed's ZeRO-3 (``deepspeed.zero.Init``, as
Transformers does under an active ZeRO-3 config), in a fresh process that never imports the
project's parallel code: DoRA's initial magnitudes are read from the whole weights, merging for
inference is refused by name, and the adapter saves whole. One real gloo rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, torch, deepspeed
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from tests.core.tiny_models import tiny_config
from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter

config = MixLoraConfig(r=4, lora_alpha=8, num_experts=2, top_k=1, use_dora=True,
                       target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
torch.manual_seed(0)
whole = AutoModelForCausalLM.from_config(tiny_config("llama"))
deepspeed.init_distributed("gloo")
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
keep = HfDeepSpeedConfig(ds)
part = AutoModelForCausalLM.from_config(tiny_config("llama"))
with torch.no_grad(), deepspeed.zero.GatheredParameters(list(part.parameters()), modifier_rank=0):
    for a, b in zip(part.parameters(), whole.parameters()):
        a.copy_(b)
partitioned = all(p.numel() == 0 for p in part.parameters())
torch.manual_seed(1)
inject_mixlora(whole, config)
torch.manual_seed(1)
inject_mixlora(part, config)
mags = {n: p for n, p in part.named_parameters() if "magnitude" in n}
ref = {n: p for n, p in whole.named_parameters() if "magnitude" in n}
diff = max(float((mags[n] - ref[n]).abs().max()) for n in ref)
from mixlora_ds.model.merge import prepare_for_inference
try:
    prepare_for_inference(part)
    refused = ""
except ValueError as e:
    refused = str(e)
save_mixlora_adapter(part, sys.argv[1])
print(json.dumps({"partitioned": partitioned, "magnitudes": len(ref), "diff": diff, "refused": refused,
                  "parallel_imported": "mixlora_ds.parallel" in sys.modules}))
"""


def test_a_user_partitioned_model_is_gathered_without_the_parallel_package(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "adapter")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["parallel_imported"] is False
    assert got["partitioned"] and got["magnitudes"] > 0 and got["diff"] == 0.0
    assert "ZeRO-3" in got["refused"]
    weights = (tmp_path / "adapter" / "adapter_config.json")
    assert weights.is_file() and json.loads(weights.read_text())["use_dora"] is True
