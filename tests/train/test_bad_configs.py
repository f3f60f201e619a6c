"""Bad run configs fail fast on every rank with a message naming the problem, and nothing hangs."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.train.conftest import REPO, launch_env, run_config, run_training, train_cmd, write_config

pytestmark = pytest.mark.distributed

CASES = {
    "unknown_key": ({"optim__lrr": 0.1}, ["unknown key 'optim.lrr'", ":"]),
    "wrong_type": ({"batch__micro_batch_size": "two"}, ["'batch.micro_batch_size' must be int", "'two'"]),
    "missing_data_dir": ({"data__train_dir": "/nonexistent/prepared"}, ["data.train_dir", "data directory not found"]),
    "batch_not_divisible": ({"batch__global_batch_size": 6, "batch__micro_batch_size": 2},
                            ["global_batch_size=6", "not divisible", "micro_batch_size (2) x world size (2)"]),
    "target_missing": ({"adapter__target_modules": ["q_proj", "fc1"]},
                       ["adapter.target_modules", "['fc1']", "not found in the llama model"]),
    "compile_under_deepspeed_zero3": ({"model__compile": True, "deepspeed__zero3_impl": "deepspeed"},
                                      ["model.compile", "zero3_impl: deepspeed", "zero3_impl: mixlora_ds"]),
    "cuda_graphs_on_cpu": ({"model__compile": True, "model__cuda_graphs": True, "model__gradient_checkpointing": False},
                           ["model.cuda_graphs needs CUDA GPUs, this run is on cpu; set model.cuda_graphs: false"]),
    "param_offload_without_deepspeed_zero3": (
        {"deepspeed__overrides": {"zero_optimization": {"offload_param": {"device": "cpu"}}}},
        ["zero_optimization.offload_param", "deepspeed.zero3_impl: deepspeed"]),
    "copy_engine_gathers_on_cpu": ({"deepspeed__zero3_gather_transport": "copy_engine"},
                                   ["deepspeed.zero3_gather_transport=copy_engine", "needs CUDA", "use auto or nccl"]),
    "negative_prefetch": ({"deepspeed__zero3_prefetch_layers": -1}, ["deepspeed.zero3_prefetch_layers", ">= 0", "-1"]),
}


def rank_env(runs_root, rank: int, port: int) -> dict[str, str]:
    env = launch_env(runs_root)
    env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


@pytest.fixture(scope="module")
def launched(assets, runs_root):
    """Every bad config started as 2 ranks at once, as srun or mpirun start them (each rank its own
    process; no launcher kills the slower rank when the first fails, so each must fail by itself)."""
    procs = {}
    for i, (case, (changes, _)) in enumerate(CASES.items()):
        out = runs_root / f"bad_{case}"
        cfg = write_config(run_config(assets, out, **changes), runs_root / f"bad_{case}.yaml")
        ranks = [subprocess.Popen(train_cmd(1, cfg), env=rank_env(runs_root, r, 29900 + i), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        procs[case] = (cfg, out, time.time(), ranks)
    results = {}
    for case, (cfg, out, t0, ranks) in procs.items():
        outputs, codes = [], []
        for proc in ranks:
            try:
                output, _ = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                output += "\n<hung: killed after 180 s>"
            outputs.append(output)
            codes.append(proc.returncode)
        results[case] = (cfg, out, codes, outputs, time.time() - t0)
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_on_every_rank(case, launched):
    cfg, out, codes, outputs, seconds = launched[case]
    fragments = CASES[case][1]
    for rank in (0, 1):
        output = outputs[rank]
        assert codes[rank] == 2, output[-3000:]
        lines = [ln for ln in output.splitlines() if ln.startswith(f"[rank {rank}] config error:")]
        assert len(lines) == 1, f"rank {rank}:\n{output[-3000:]}"
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
        assert str(cfg) in lines[0]
        # A clean message, not an exception escaping, and no engine was ever built.
        assert "Traceback" not in output and "ZeRO stage" not in output
    assert not (out / "checkpoints").exists()
    assert seconds < 150


def test_launcher_returns_promptly_on_a_bad_config(assets, runs_root):
    """Under torchrun the first failing rank ends the job: non-zero exit, no hang."""
    out = runs_root / "bad_torchrun"
    cfg = write_config(run_config(assets, out, optim__lrr=0.1), runs_root / "bad_torchrun.yaml")
    result = run_training(2, cfg, out, timeout=180)
    assert result.returncode != 0
    assert "config error:" in result.output and "unknown key 'optim.lrr'" in result.output


@pytest.mark.parametrize("ds_config", ["zero3_cpu.json", "zero2_bf16.json"])
def test_diverged_run_stops_before_saving(assets, runs_root, ds_config):
    """The loop itself stops a run whose loss or gradient norm is no longer finite (the shipped ZeRO-2
    config turns DeepSpeed's overflow check off; in fp32 it is off anyway): exit 3, a message naming
    the steps, and no checkpoint or adapter written after it."""
    out = runs_root / f"diverged_{ds_config.split('.')[0]}"
    cfg = run_config(assets, out, optim__lr=1e30, schedule__warmup_steps=0, schedule__type="constant",
                     eval__every_steps=0, checkpoint__every_steps=2,
                     deepspeed__config=str(REPO / "ds_configs" / ds_config))
    result = run_training(1, write_config(cfg, runs_root / f"{out.name}.yaml"), out)
    assert result.returncode == 3, result.output[-3000:]
    assert "training diverged: non-finite training loss or gradient norm within steps" in result.output
    assert not (out / "adapter").exists()
    from mixlora_ds.train.checkpoint import list_checkpoints

    saved = [c.step for c in list_checkpoints(str(out / "checkpoints"), complete_only=False)]
    assert saved == [], saved  # lr 1e30: the first update already breaks the model
