"""Expert parallelism through the training CLI, on real DeepSpeed ranks (gloo): the same curve, gradient
norms, held-out loss and exported adapter as the run without it; resume across EP sizes; refusals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.train.conftest import (REPO, TRAIN, assert_ok, kill_group, launch_env, max_adapter_diff, read_eval,
                                  run_config, run_training, start_training, wait_for_step, worker_pids,
                                  write_config)

pytestmark = pytest.mark.distributed


def assert_same_run(a, b, steps=None, tol: float = 1e-5) -> None:
    ma, mb = a.metrics(), b.metrics()
    steps = steps or sorted(mb)
    assert [s for s in steps if s in ma] == steps, (sorted(ma), steps)
    assert max(abs(ma[s]["loss"] - mb[s]["loss"]) for s in steps) <= tol
    assert max(abs(ma[s]["grad_norm"] - mb[s]["grad_norm"]) for s in steps) <= tol
    assert max_adapter_diff(a.out_dir / "adapter", b.out_dir / "adapter") <= tol


@pytest.fixture(scope="module")
def ep4_dp2_run(assets, runs_root):
    """4 ranks: 2 data-parallel x 2 expert-parallel."""
    out = runs_root / "ep2_of_4"
    cfg = run_config(assets, out, parallel={"expert_parallel_size": 2})
    result = run_training(4, write_config(cfg, runs_root / "ep2_of_4.yaml"), out, timeout=480)
    assert_ok(result)
    return result


def test_ep2_on_two_ranks_equals_the_run_without_it(reference_run, assets, runs_root):
    out = runs_root / "ep2"
    cfg = run_config(assets, out, parallel={"expert_parallel_size": 2})
    result = run_training(2, write_config(cfg, runs_root / "ep2.yaml"), out)
    assert_ok(result)
    assert "expert parallelism over 2 ranks (estimate)" in result.output
    assert_same_run(result, reference_run)
    ea, eb = read_eval(out), read_eval(reference_run.out_dir)
    assert sorted(ea) == sorted(eb) and max(abs(ea[s] - eb[s]) for s in ea) <= 1e-5
    # TensorBoard: tokens each EP rank received, their imbalance per layer, the all-to-all time share.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"ep/tokens_received/ep_rank_0", "ep/tokens_received/ep_rank_1", "ep/received_imbalance/layer_1",
            "ep/received_imbalance_max", "ep/bytes_sent_per_step", "ep/all_to_all_time_share"} <= tags
    share = [e.value for e in acc.Scalars("ep/all_to_all_time_share")]
    assert all(0 < x < 1 for x in share)
    # Each EP rank saved its own experts, beside DeepSpeed's files.
    for step in ("step_00000004", "step_00000008"):
        shards = sorted(p.name for p in (out / "checkpoints" / step).glob("experts_*"))
        assert shards == ["experts_000_of_002.pt", "experts_001_of_002.pt"]


def test_two_data_parallel_by_two_expert_parallel_equals_the_run_without_it(ep4_dp2_run, reference_run):
    assert_same_run(ep4_dp2_run, reference_run)


def test_resume_with_another_ep_size_reshards_the_experts(ep4_dp2_run, reference_run, assets, runs_root):
    """The EP-2 run's step-4 checkpoint resumed by 4 ranks with EP 4 gives the uninterrupted curve."""
    out = runs_root / "ep4_resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ep4_dp2_run.out_dir / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    cfg = run_config(assets, out, parallel={"expert_parallel_size": 4})
    result = run_training(4, write_config(cfg, runs_root / "ep4_resumed.yaml"), out, "--resume", "auto",
                          timeout=480)
    assert_ok(result)
    assert "resumed from" in result.output
    assert_same_run(result, reference_run, steps=[5, 6, 7, 8])


def test_resume_into_another_world_size_is_refused_by_name(ep4_dp2_run, assets, runs_root):
    """Experts reshard across EP sizes, but DeepSpeed's partitions of the replicated adapter and the
    readers' positions are per rank: a 4-rank checkpoint resumed by 2 ranks is refused, naming both."""
    out = runs_root / "ep_world_changed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ep4_dp2_run.out_dir / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    cfg = run_config(assets, out, parallel={"expert_parallel_size": 2})
    result = run_training(2, write_config(cfg, runs_root / "ep_world_changed.yaml"), out, "--resume", "auto")
    assert result.returncode != 0, result.output[-3000:]
    assert "saved with 4 ranks, resuming with 2" in result.output
    assert not (out / "adapter").exists()


def test_an_adapter_loaded_into_an_ep_run_hands_each_rank_its_experts(reference_run, assets, runs_root):
    """model.init_adapter: an EP-2 run starting from the reference run's exported adapter trains exactly
    as a run without EP from the same adapter, and not as a fresh start."""
    start = str(reference_run.out_dir / "adapter")
    runs = {}
    for name, parallel in (("init_no_ep", {}), ("init_ep2", {"expert_parallel_size": 2})):
        out = runs_root / name
        cfg = run_config(assets, out, max_steps=4, parallel=parallel or {"expert_parallel_size": 1})
        cfg["model"]["init_adapter"] = start
        runs[name] = run_training(2, write_config(cfg, runs_root / f"{name}.yaml"), out)
        assert_ok(runs[name])
        assert f"adapter initialised from {start}" in runs[name].output
    assert_same_run(runs["init_ep2"], runs["init_no_ep"])
    # Not a fresh start: the first loss is the trained adapter's, far below the reference run's first.
    assert runs["init_ep2"].metrics()[1]["loss"] < reference_run.metrics()[1]["loss"] - 0.1


@pytest.mark.parametrize("change, message", [
    ({"adapter__num_experts": 8}, "has num_experts=4, the run's adapter.num_experts is 8"),
    ({"adapter__expert_lora": {"r": 8}}, "has expert r=4, the run's adapter has 8"),
])
def test_an_initial_adapter_of_another_shape_is_refused_by_name(reference_run, assets, tmp_path, change, message):
    cfg = run_config(assets, tmp_path / "run", **change)
    cfg["model"]["init_adapter"] = str(reference_run.out_dir / "adapter")
    path = write_config(cfg, tmp_path / "init.yaml")
    env = launch_env(tmp_path)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    p = subprocess.run([sys.executable, TRAIN, "--config", str(path), "--validate-only"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and f"{path}:" in p.stderr


def test_resume_without_ep_into_ep_is_refused(reference_run, assets, runs_root):
    out = runs_root / "no_ep_to_ep"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run.out_dir / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
    cfg = run_config(assets, out, parallel={"expert_parallel_size": 2})
    result = run_training(2, write_config(cfg, runs_root / "no_ep_to_ep.yaml"), out, "--resume", "auto")
    assert result.returncode != 0, result.output[-3000:]  # each rank exits 2; torchrun itself 1
    assert "saved with parallel.expert_parallel_size=1, this run has 2" in result.output


def test_a_rank_killed_mid_step_ends_the_others_in_bounded_time(assets, runs_root):
    out = runs_root / "ep_killed"
    cfg = run_config(assets, out, max_steps=40, parallel={"expert_parallel_size": 2},
                     checkpoint={"every_steps": 0, "keep_last": 1})
    proc = start_training(2, write_config(cfg, runs_root / "ep_killed.yaml"), out, runs_root / "ep_killed.log")
    try:
        wait_for_step(out, 2, proc)
        victim = worker_pids(proc)[-1]
        t = time.time()
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=150)  # the run's collective timeout is 1 minute
        assert proc.returncode != 0
        assert time.time() - t < 150
    finally:
        kill_group(proc, signal.SIGKILL)


@pytest.mark.parametrize("ep, world, extra, message", [
    (3, 1, {}, "parallel.expert_parallel_size=3 does not divide adapter.num_experts=4"),
    (2, 1, {}, "parallel.expert_parallel_size=2 does not divide the world size 1"),
    (2, 2, {"deepspeed": {"zero3_impl": "deepspeed"}}, "use deepspeed.zero3_impl: mixlora_ds"),
    (2, 2, {"adapter": {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                        "target_modules": ["q_proj"]}}, "needs a MixLoRA adapter"),
    (0, 1, {}, "'parallel.expert_parallel_size' must be >= 1"),
])
def test_bad_expert_parallel_settings_are_refused_before_any_work(assets, tmp_path, ep, world, extra, message):
    cfg = run_config(assets, tmp_path / "run", **extra)
    cfg["parallel"] = {"expert_parallel_size": ep}
    path = write_config(cfg, tmp_path / "bad.yaml")
    env = launch_env(tmp_path)
    env.update(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0")
    p = subprocess.run([sys.executable, TRAIN, "--config", str(path), "--validate-only"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr
    assert f"{path}:" in p.stderr  # names the file (and line) of the key
