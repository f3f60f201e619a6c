"""Fixtures for the training tests: real data, a real base model on disk, real multi-process runs.

Everything is made here from nothing: the project's sample data, a tokenizer trained on it, packed
shards written by data_prep/prepare.py, and a tiny LLaMA with random weights saved as safetensors.
Training runs are real ``torchrun`` launches of launch/train.py (DeepSpeed on its CPU accelerator,
gloo) with a private TORCH_EXTENSIONS_DIR, a low DEEPSPEED_TIMEOUT and a hard timeout, so a hang
fails the test instead of stalling the suite. Runs that several tests inspect are made once per
session.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launch" / "train.py")
TASKS = ("arc-e", "boolq", "obqa")
SEQ_LEN = 128
TINY_MODEL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
MIXLORA = dict(peft_type="MIXLORA", r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2,
               router_aux_loss_coef=0.01,
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
RUN_TIMEOUT = 240  # seconds for one launch; a healthy one takes 10-30 s on 2 busy cores


@dataclass
class Assets:
    root: Path
    sample: Path
    tokenizer: Path
    data: Path
    base: Path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    """Sample data -> tokenizer -> packed shards (train + eval) -> random tiny base on disk."""
    from data_prep.build_tokenizer import build_tokenizer
    from data_prep.prepare import main as prepare_main
    from mixlora_ds.data.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("train_assets")
    paths = write_sample_data(root / "sample", train_size=64, eval_size=16)
    build_tokenizer([root / "sample"], root / "tokenizer", vocab_size=TINY_MODEL["vocab_size"])
    argv = ["--tokenizer", str(root / "tokenizer"), "--seq-len", str(SEQ_LEN), "--out", str(root / "data"),
            "--no-progress"]
    for task in TASKS:
        argv += ["--input", f"{paths[task]['train']}:{task}", "--eval-input", f"{paths[task]['eval']}:{task}"]
    assert prepare_main(argv) == 0
    base = root / "base"
    save_random_base(base, seed=7)
    return Assets(root, root / "sample", root / "tokenizer", root / "data", base)


def save_random_base(path: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_MODEL)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------------- run configs
def run_config(assets: Assets, out: Path, **changes: Any) -> dict[str, Any]:
    """A run config for the tiny base; ``changes`` use dotted keys (``optim__lr`` = optim.lr)."""
    cfg: dict[str, Any] = {
        "run_name": out.name, "output_dir": str(out), "seed": 11, "max_steps": 8,
        "model": {"name_or_path": str(assets.base), "attn_implementation": "sdpa", "gradient_checkpointing": True},
        "adapter": dict(MIXLORA),
        "data": {"train_dir": str(assets.data), "eval_split": "eval"},
        "batch": {"micro_batch_size": 1, "global_batch_size": 4},
        "optim": {"lr": 5e-3, "weight_decay": 0.01, "max_grad_norm": 1.0, "impl": "torch"},
        "schedule": {"type": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "logging": {"every_steps": 1, "heatmap_every_steps": 4, "peak_tflops": 1.0, "progress_bar": False},
        "eval": {"every_steps": 4, "max_batches": None},
        "deepspeed": {"config": str(REPO / "ds_configs" / "zero3_cpu.json"), "timeout_minutes": 1},
    }
    for key, value in changes.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ launching
def launch_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DEEPSPEED_TIMEOUT="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(k, None)
    return env


def train_cmd(nproc: int, config: Path, *extra: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN, "--config", str(config), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            TRAIN, "--config", str(config), *extra]


@dataclass
class RunResult:
    returncode: int
    output: str
    out_dir: Path
    seconds: float

    def metrics(self) -> dict[int, dict[str, float]]:
        return read_metrics(self.out_dir)


def run_training(nproc: int, config: Path, out_dir: Path, *extra: str, timeout: int = RUN_TIMEOUT) -> RunResult:
    t = time.time()
    p = subprocess.run(train_cmd(nproc, config, *extra), env=launch_env(out_dir.parent), cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    return RunResult(p.returncode, p.stdout + p.stderr, out_dir, time.time() - t)


def start_training(nproc: int, config: Path, out_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    """Launch in the background, in a new session so the whole process group can be signalled."""
    f = open(log, "w")
    return subprocess.Popen(train_cmd(nproc, config, *extra), env=launch_env(out_dir.parent), cwd=REPO,
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def start_ranks(nproc: int, config: Path, out_dir: Path, log: Path, *extra: str) -> list[subprocess.Popen]:
    """Start the ranks directly, one process each with the rendezvous variables, as srun or mpirun do:
    no launcher between them and the test, so each rank's own exit status and reactions are seen.
    Rank r writes to ``log`` with suffix ``.rank<r>``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(nproc):
        env = dict(launch_env(out_dir.parent), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        f = open(f"{log}.rank{rank}", "w")
        procs.append(subprocess.Popen([sys.executable, TRAIN, "--config", str(config), *extra], env=env, cwd=REPO,
                                      stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def run_ranks(nproc: int, config: Path, out_dir: Path, *extra: str, timeout: int = RUN_TIMEOUT) -> RunResult:
    """:func:`start_ranks` to the end: ``returncode`` is the first non-zero status of a rank (else 0),
    ``output`` every rank's, in rank order."""
    t = time.time()
    log = out_dir.parent / f"{out_dir.name}.direct.log"
    procs = start_ranks(nproc, config, out_dir, log, *extra)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            kill_group(p, 9)
    output = "".join(Path(f"{log}.rank{r}").read_text() for r in range(nproc))
    return RunResult(next((c for c in codes if c), 0), output, out_dir, time.time() - t)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    import psutil

    children = psutil.Process(launcher.pid).children(recursive=True)
    return [c.pid for c in children if "train.py" in " ".join(c.cmdline())]


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> int:
    """Poll metrics.jsonl until some step >= ``step`` is logged; returns the latest step seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = read_metrics(out_dir)
        if m and max(m) >= step:
            return max(m)
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def read_metrics(out_dir: Path) -> dict[int, dict[str, float]]:
    """Per-step training metrics; a step logged twice (re-run after a resume) keeps the last."""
    path = out_dir / "metrics.jsonl"
    out: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def read_eval(out_dir: Path) -> dict[int, float]:
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval/loss" in rec:
            out[rec["step"]] = rec["eval/loss"]
    return out


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the launch's process group and every process below it: torchrun starts each worker in
    a session of its own, out of the launcher's group."""
    import psutil

    try:
        below = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        below = []
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def max_adapter_diff(a: Path, b: Path) -> float:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:5]
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def assert_ok(result: RunResult) -> None:
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.output[-6000:]}"


# ------------------------------------------------------------------------- runs shared by tests
@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_runs")


def _two_rank_run(runs_root: Path, name: str, make_config) -> RunResult:
    out = runs_root / name
    result = run_training(2, write_config(make_config(out), runs_root / f"{name}.yaml"), out)
    assert_ok(result)
    return result


@pytest.fixture(scope="session")
def reference_run(assets, runs_root) -> RunResult:
    """2 ranks, ZeRO-3, dropout 0, 8 steps: compared with a single-process PyTorch oracle."""
    return _two_rank_run(runs_root, "reference", lambda out: run_config(assets, out))


@pytest.fixture(scope="session")
def dropout_run(assets, runs_root) -> RunResult:
    """2 ranks, ZeRO-3, LoRA dropout on, 12 steps, uninterrupted: the reference for resume tests."""
    return _two_rank_run(runs_root, "dropout", lambda out: dropout_config(assets, out))


def dropout_config(assets: Assets, out: Path) -> dict[str, Any]:
    return run_config(assets, out, max_steps=12, adapter__lora_dropout=0.1, checkpoint__every_steps=4,
                      checkpoint__keep_last=2)


@pytest.fixture(scope="session", autouse=True)
def _clean_shm_segments():
    """DeepSpeed's CPU shared-memory all-reduce leaves /dev/shm segments per rank; remove ours."""
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    for path in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
        try:
            os.unlink(path)
        except OSError:
            pass

