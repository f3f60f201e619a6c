"""Single-process checks of the config schema, DeepSpeed config resolution, schedule, Slurm mapping
and checkpoint discovery (the multi-process behaviour is tested in the other files)."""

from __future__ import annotations

import json
import math

import pytest
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from mixlora_ds import dist
from mixlora_ds.train.checkpoint import COMPLETE, CheckpointError, find_resume, list_checkpoints
from mixlora_ds.train.config import TrainConfigError, load_config, parse_overrides
from mixlora_ds.train.ds_config import engine_ds_config, resolve_ds_config, shards_base_itself
from mixlora_ds.train.monitor import heatmap_image
from mixlora_ds.train.plan import check_compile
from mixlora_ds.train.schedule import lr_factor

from tests.train.conftest import REPO


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, key, known", [
    ("seed: 1\noptim:\n  lr: 1.0e-4\n  lrr: 2\n", "optim.lrr", "max_grad_norm"),
    ("seed: 1\nadapter:\n  r: 8\n  num_expert: 4\n", "adapter.num_expert", "num_experts"),  # the adapter's own keys
])
def test_unknown_key_names_file_line_and_known_keys(tmp_path, text, key, known):
    path = write(tmp_path, text)
    with pytest.raises(TrainConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4:") and f"unknown key '{key}'" in msg and known in msg
    assert e.value.key == key


def test_type_errors_and_yaml_number_quirk(tmp_path):
    with pytest.raises(TrainConfigError, match=r":2: 'batch.micro_batch_size' must be int, got str"):
        load_config(write(tmp_path, "batch:\n  micro_batch_size: two\n"))
    with pytest.raises(TrainConfigError, match="'logging.progress_bar' must be bool"):
        load_config(write(tmp_path, "logging:\n  progress_bar: 3\n"))
    with pytest.raises(TrainConfigError, match="'schedule.type' must be one of 'constant', 'cosine', 'linear'"):
        load_config(write(tmp_path, "schedule:\n  type: exp\n"))
    # YAML 1.1 reads 2e-4 (no dot) as a string; a float field still takes it.
    assert load_config(write(tmp_path, "optim:\n  lr: 2e-4\n")).optim.lr == 2e-4
    with pytest.raises(TrainConfigError, match="schema_version 9 is not supported"):
        load_config(write(tmp_path, "schema_version: 9\n"))


def test_command_line_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["--optim.lr", "3e-4", "--batch.global_batch_size=16", "--adapter.target_modules",
                             "[q_proj, v_proj]", "--deepspeed.overrides", "{zero_optimization: {stage: 2}}"])
    assert cfg.optim.lr == 3e-4 and cfg.batch.global_batch_size == 16
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.deepspeed.overrides == {"zero_optimization": {"stage": 2}}
    with pytest.raises(TrainConfigError, match=r"command line --optim\.bogus: unknown key"):
        load_config(path, ["--optim.bogus", "1"])
    with pytest.raises(TrainConfigError, match="missing value"):
        parse_overrides(["--seed"])


def ds_file(tmp_path, data):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_ds_auto_values_resolved_from_the_run_config(tmp_path):
    cfg = load_config(str(REPO / "configs" / "llama2-7b-mixlora.yaml"))
    shipped = resolve_ds_config(cfg, world_size=4, hidden_size=4096, device="cuda")
    assert shipped["zero_optimization"]["stage"] == 2 and cfg.model.compile  # a 7B base fits each GPU
    cfg.deepspeed.config = str(REPO / "ds_configs" / "zero3_bf16.json")  # what larger bases use
    ds = resolve_ds_config(cfg, world_size=4, hidden_size=4096, device="cuda")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["torch_adam"] is True
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 4096 * 4096
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    cpu = resolve_ds_config(load_config(str(REPO / "configs" / "tiny.yaml")), 2, 64, "cpu")
    assert cpu["bf16"]["enabled"] is False
    assert cpu["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("ds, message", [
    ({"train_micro_batch_size_per_gpu": 4}, "'train_micro_batch_size_per_gpu' is 4 but the run config gives 1"),
    ({"gradient_clipping": 0.5}, "'gradient_clipping' is 0.5"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "'zero_optimization.sub_group_size' is \"auto\""),
    ({"scheduler": {"type": "WarmupLR"}}, "the learning-rate schedule lives in the run config"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type must be AdamW"),
    ({"zero_optimization": {"stage": 5}}, "stage must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
     "invalid zero_optimization section: offload_optimizer.device: Input should be 'none', 'cpu' or 'nvme'"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket": 5}},
     "invalid zero_optimization section: stage3_prefetch_bucket: Extra inputs are not permitted"),
])
def test_ds_contradictions_and_unresolvable_auto_refused(tmp_path, ds, message):
    cfg = load_config(None, ["--deepspeed.config", ds_file(tmp_path, ds), "--batch.global_batch_size", "2",
                             "--batch.micro_batch_size", "1"])
    with pytest.raises(TrainConfigError) as e:
        resolve_ds_config(cfg, world_size=2, hidden_size=64, device="cpu")
    assert message in str(e.value) and str(tmp_path / "ds.json") in str(e.value)


def test_zero3_engine_config_for_mixlora_ds_sharding():
    """Under ZeRO-3 with the base sharded by mixlora_ds, DeepSpeed's engine gets stage 2 and none of
    the stage-3-only keys; with ``zero3_impl: deepspeed`` it gets the config as resolved."""
    cfg = load_config(str(REPO / "configs" / "llama2-7b-mixlora.yaml"),
                      ["--deepspeed.config", str(REPO / "ds_configs" / "zero3_bf16.json")])
    ds = resolve_ds_config(cfg, world_size=4, hidden_size=4096, device="cuda")
    assert shards_base_itself(cfg, ds)
    engine = engine_ds_config(cfg, ds)
    z = engine["zero_optimization"]
    assert z["stage"] == 2 and not any(k.startswith("stage3_") for k in z) and "memory_efficient_linear" not in z
    assert z["overlap_comm"] is False and z["reduce_bucket_size"] == 4096 * 4096
    assert engine["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["zero_optimization"]["stage"] == 3  # the resolved config itself is left alone
    DeepSpeedZeroConfig(**z)  # and the engine's section is one DeepSpeed accepts
    cfg.deepspeed.zero3_impl = "deepspeed"
    assert not shards_base_itself(cfg, ds) and engine_ds_config(cfg, ds) is ds


@pytest.mark.parametrize("zero, key", [
    ({"offload_param": {"device": "cpu"}}, "offload_param"),
    ({"cpu_offload_param": True}, "cpu_offload_param"),
    ({"offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, "offload_optimizer.device nvme"),
    ({"offload_optimizer": {"device": "cpu", "ratio": 0.5}}, "offload_optimizer.ratio"),
    ({"zero_quantized_weights": True}, "zero_quantized_weights"),
    ({"zero_quantized_gradients": True}, "zero_quantized_gradients"),
    ({"zero_hpz_partition_size": 2}, "zero_hpz_partition_size"),
])
def test_stage3_features_only_deepspeeds_engine_has_are_refused(tmp_path, zero, key):
    path = ds_file(tmp_path, {"zero_optimization": dict(stage=3, **zero)})
    cfg = load_config(None, ["--deepspeed.config", path, "--batch.global_batch_size", "2",
                             "--batch.micro_batch_size", "1"])
    ds = resolve_ds_config(cfg, world_size=2, hidden_size=64, device="cpu")
    with pytest.raises(TrainConfigError) as e:
        engine_ds_config(cfg, ds)
    assert f"zero_optimization.{key}" in str(e.value) and "deepspeed.zero3_impl: deepspeed" in str(e.value)
    assert path in str(e.value)


def test_cpu_adam_needs_offload(tmp_path):
    cfg = load_config(None, ["--deepspeed.config", ds_file(tmp_path, {}), "--optim.impl", "cpu_adam"])
    with pytest.raises(TrainConfigError, match="cpu_adam needs zero_optimization.offload_optimizer"):
        resolve_ds_config(cfg, world_size=1, hidden_size=64, device="cpu")


def test_cuda_graphs_needs_compile_and_no_checkpointing(tmp_path):
    with pytest.raises(TrainConfigError, match=r":3: 'model.cuda_graphs' needs model.compile: true"):
        load_config(write(tmp_path, "model:\n  gradient_checkpointing: false\n  cuda_graphs: true\n"))
    with pytest.raises(TrainConfigError, match="'model.cuda_graphs' does not work with model.gradient_checkpointing"):
        load_config(None, ["--model.compile", "true", "--model.cuda_graphs", "true"])
    flags = ["--model.compile", "true", "--model.cuda_graphs", "true", "--model.gradient_checkpointing", "false"]
    assert load_config(None, flags).model.cuda_graphs


@pytest.mark.parametrize("stage, ep, device, why", [
    (2, 1, "cpu", "needs CUDA GPUs, this run is on cpu"),
    (3, 1, "cuda", "does not work with ZeRO-3"),
    (2, 2, "cuda", "does not work with expert parallelism"),
])
def test_cuda_graphs_refused_where_replays_cannot_work(stage, ep, device, why):
    flags = ["--model.compile", "true", "--model.cuda_graphs", "true", "--model.gradient_checkpointing", "false",
             "--parallel.expert_parallel_size", str(ep)]
    cfg = load_config(None, flags)
    with pytest.raises(TrainConfigError, match=f"model.cuda_graphs {why}"):
        check_compile(cfg, stage, shards_base=stage == 3, device=device)
    cfg.model.cuda_graphs = False
    check_compile(cfg, stage, shards_base=stage == 3, device=device)


def test_schedule_shapes():
    assert [lr_factor("constant", 2, 10, 0.0)(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = lr_factor("cosine", 0, 10, 0.1)
    assert cos(0) == 1.0 and math.isclose(cos(5), 0.55) and math.isclose(cos(10), 0.1)
    lin = lr_factor("linear", 2, 12, 0.0)
    assert lin(1) == 1.0 and math.isclose(lin(7), 0.5) and lin(12) == 0.0


def test_slurm_environment_mapping():
    assert dist.parse_hostlist("gpu[01-03,07],login") == ["gpu01", "gpu02", "gpu03", "gpu07", "login"]
    assert dist.parse_hostlist("node1") == ["node1"]
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "node[3-6]"}
    set_ = dist.map_slurm_env(env)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] in ("node3",) and env["MASTER_PORT"] == str(20000 + 1234)
    assert set(set_) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    # A launcher that already set the rendezvous wins.
    launched = {"SLURM_PROCID": "0", "RANK": "3", "WORLD_SIZE": "4"}
    assert dist.map_slurm_env(launched) == {} and launched["RANK"] == "3"


def test_resume_finds_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    for step, complete in ((4, True), (8, True), (12, False)):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2}))
    assert [c.step for c in list_checkpoints(str(root))] == [4, 8]
    assert find_resume("auto", str(root)).step == 8  # the crashed save of step 12 is ignored
    assert find_resume("auto", str(tmp_path / "none")) is None
    assert find_resume(None, str(root)) is None
    assert find_resume(str(root), str(root)).step == 8
    with pytest.raises(CheckpointError, match="incomplete"):
        find_resume(str(root / "step_00000012"), str(root))


def test_resume_refuses_another_engine_stage(tmp_path):
    """The engine stage a checkpoint was written with comes from its marker, or, for checkpoints from
    before the marker recorded it, from its ds_config.json; resuming into another stage is refused."""
    from mixlora_ds.train.checkpoint import CheckpointInfo, check_engine_stage

    old = tmp_path / "step_00000004"
    old.mkdir()
    (old / "ds_config.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    check_engine_stage(CheckpointInfo(str(old), 4, {"step": 4}), 3)
    with pytest.raises(CheckpointError, match="written by a DeepSpeed engine at ZeRO stage 3, this run's engine "
                                              "is at stage 2"):
        check_engine_stage(CheckpointInfo(str(old), 4, {"step": 4}), 2)
    new = CheckpointInfo(str(old), 4, {"step": 4, "engine_stage": 2})  # the marker wins over the file
    check_engine_stage(new, 2)
    with pytest.raises(CheckpointError, match="deepspeed.zero3_impl"):
        check_engine_stage(new, 3)


def test_heatmap_image():
    img = heatmap_image([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]], cell=4)
    assert img.shape == (8, 16, 3) and img.dtype.name == "uint8"
    assert tuple(img[0, 0]) != tuple(img[0, 15])  # load 0.5 and 0.0 get different colours


def test_a_rank_that_saw_no_stop_adopts_the_reason_the_others_saw():
    # Ranks notice a stop at different times; after the step's all-reduce of their votes a rank that
    # saw nothing itself (rank 0, say, which writes the log and the stop marker) names the real cause.
    from mixlora_ds.train.signals import LAUNCHER_EXITED, StopRequest

    ranks = [StopRequest() for _ in range(3)]
    ranks[1].reason = LAUNCHER_EXITED
    summed = [sum(v) for v in zip(*(r.votes() for r in ranks))]
    for r in ranks:
        r.adopt(summed)
    assert [r.reason for r in ranks] == [LAUNCHER_EXITED] * 3
    quiet = [StopRequest(), StopRequest()]
    for r in quiet:
        r.adopt([sum(v) for v in zip(*(q.votes() for q in quiet))])
    assert [r.reason for r in quiet] == [None, None]
    mixed = [StopRequest(), StopRequest(), StopRequest()]
    mixed[0].reason, mixed[1].reason = "signal SIGTERM", "signal SIGTERM"
    mixed[2].reason = LAUNCHER_EXITED  # a rank keeps what it saw itself
    summed = [sum(v) for v in zip(*(r.votes() for r in mixed))]
    for r in mixed:
        r.adopt(summed)
    assert [r.reason for r in mixed] == ["signal SIGTERM", "signal SIGTERM", LAUNCHER_EXITED]
