"""launch/evaluate.py end to end: outputs, TensorBoard, bad input, and data-parallel runs on 2 real
gloo processes (torchrun and the deepspeed launcher) that must give the single-process result."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from mixlora_ds.eval import EvalOptions, evaluate_task, find_task_file, load_task

from .conftest import REPO, write_jsonl


def _evaluate_main():
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _common(base_dir, mixlora_dir, data_dir) -> list[str]:
    return ["--base-model", str(base_dir), "--adapter", str(mixlora_dir), "--data-dir", str(data_dir),
            "--dtype", "float32", "--device", "cpu", "--no-progress", "--save-predictions"]


def test_evaluate_cli_writes_json_table_and_tensorboard(base_dir, mixlora_dir, data_dir, mixlora_model, tokenizer, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, md, tb = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "tb"
    rc = _evaluate_main()(_common(base_dir, mixlora_dir, data_dir) + [
        "--tasks", "boolq,arc-e", "--batch-size", "5", "--method", "MixLoRA",
        "--output", str(out), "--markdown", str(md), "--log-dir", str(tb), "--step", "7"])
    assert rc == 0
    doc = json.loads(out.read_text())
    for name in ("arc-e", "boolq"):
        api = evaluate_task(mixlora_model, tokenizer, load_task(name, find_task_file(data_dir, name, "eval")),
                            EvalOptions(batch_size=5, progress=False))
        assert doc["tasks"][name]["predictions"] == api.predictions
        assert doc["tasks"][name]["correct"] == api.correct
        assert doc["tasks"][name]["expert_load"]["counts"] == api.expert_load["counts"]
    table = md.read_text().splitlines()
    assert table[0] == "| Method | ARC-e | BoolQ | AVG |"
    acc_e, acc_b = doc["tasks"]["arc-e"]["accuracy"], doc["tasks"]["boolq"]["accuracy"]
    assert table[2] == f"| MixLoRA | {100 * acc_e:.1f} | {100 * acc_b:.1f} | {50 * (acc_e + acc_b):.1f} |"
    assert doc["average_accuracy"] == pytest.approx((acc_e + acc_b) / 2)

    ea = EventAccumulator(str(tb))
    ea.Reload()
    scalars = ea.Tags()["scalars"]
    [event] = ea.Scalars("eval/boolq/accuracy")
    assert event.step == 7 and event.value == pytest.approx(acc_b)
    load = doc["tasks"]["arc-e"]["expert_load"]
    [std1] = ea.Scalars("eval/arc-e/expert_load/layer1/std")
    assert std1.value == pytest.approx(load["share_std"][1], rel=1e-6)
    [e3] = ea.Scalars("eval/arc-e/expert_load/layer0/expert3")
    assert e3.value == pytest.approx(load["share"][0][3], rel=1e-6)
    assert "eval/average_accuracy" in scalars


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "arc-x"], "unknown task(s) ['arc-x']"),
        (["--custom-task", "mine=EMPTY"], "task file has no records"),
        (["--tasks", "piqa", "--split", "train"], "no 'train' file for task 'piqa'"),
        (["--tasks", "boolq", "--adapter", "MISSING"], "adapter directory not found"),
        (["--custom-task", "mine"], "--custom-task expects NAME=PATH"),
    ],
)
def test_evaluate_cli_bad_input(base_dir, mixlora_dir, data_dir, tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    extra = [a.replace("EMPTY", str(empty)).replace("MISSING", str(tmp_path / "missing")) for a in extra]
    out = tmp_path / "r.json"
    rc = _evaluate_main()(_common(base_dir, mixlora_dir, data_dir) + extra + ["--output", str(out)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPSPEED_TIMEOUT": "2", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def dp_inputs(base_dir, mixlora_dir, data_dir, tmp_path_factory):
    """Arguments with uneven shards (11 ARC examples on 2 ranks) and a one-example task (rank 1 idle)."""
    d = tmp_path_factory.mktemp("dp")
    one = write_jsonl(d / "one.jsonl", [{"question": "warm?", "choices": ["sun", "ice"], "answer": 0}])
    args = _common(base_dir, mixlora_dir, data_dir) + ["--tasks", "arc-e,hellaswag", "--limit", "11",
                                                       "--custom-task", f"one={one}", "--batch-size", "4"]
    single = d / "single.json"
    assert _evaluate_main()(args + ["--output", str(single)]) == 0
    return args, json.loads(single.read_text())


def _assert_same_results(single: dict, dp: dict) -> None:
    assert dp["meta"]["world_size"] == 2 and single["meta"]["world_size"] == 1
    assert single["tasks"].keys() == dp["tasks"].keys()
    for name, a in single["tasks"].items():
        b = dp["tasks"][name]
        for key in ("n", "correct", "accuracy", "predictions", "truncated"):
            assert a[key] == b[key], (name, key)
        la, lb = a["expert_load"], b["expert_load"]
        assert la["counts"] == lb["counts"] and la["tokens"] == lb["tokens"]
        assert la["router_entropy"] == pytest.approx(lb["router_entropy"], rel=1e-6)


@pytest.mark.distributed
def test_data_parallel_torchrun_matches_single_process(dp_inputs, tmp_path):
    args, single = dp_inputs
    out = tmp_path / "dp.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "launch/evaluate.py", *args, "--output", str(out)], tmp_path)
    _assert_same_results(single, json.loads(out.read_text()))


@pytest.mark.distributed
def test_data_parallel_deepspeed_launcher_matches_single_process(dp_inputs, tmp_path):
    args, single = dp_inputs
    out = tmp_path / "dp.json"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    _run([deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()),
          "launch/evaluate.py", *args, "--output", str(out)], tmp_path)
    _assert_same_results(single, json.loads(out.read_text()))
