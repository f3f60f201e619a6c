"""Run directories and checkpoint files without ranks: ownership, ``--overwrite``, metrics cut back on
resume, and checkpoint verification (real files, real checksums)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mixlora_ds.train.checkpoint import (COMPLETE, CheckpointError, file_manifest, list_checkpoints,
                                         select_checkpoint, verify_checkpoint, writer_rank)
from mixlora_ds.train.run_dir import clear_previous_run, decide_start, truncate_metrics, write_run_record


def layout(out: Path) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(out), checkpoint_dir=str(out / "checkpoints"),
                           tensorboard_dir=str(out / "tensorboard"), export_dir=str(out / "adapter"), run_name="r")


def fake_checkpoint(root: Path, step: int, run_id: str | None, files: dict[str, bytes] | None = None) -> Path:
    """A checkpoint directory as CheckpointManager leaves it: files, then a marker with their checksums."""
    d = root / f"step_{step:08d}"
    (d / "sub").mkdir(parents=True)
    files = files or {"mp_rank_00_model_states.pt": b"m" * 1000, "sub/optim_states.pt": bytes(range(256)) * 9,
                      "rank_00000.pt": b"r0" * 50, "rank_00001.pt": b"r1" * 50}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    meta = {"step": step, "world_size": 2, "run_id": run_id, "files": file_manifest(str(d))}
    (d / COMPLETE).write_text(json.dumps(meta))
    return d


def finished_run(out: Path, run_id: str = "aaa") -> None:
    write_run_record(str(out), run_id, "old")
    for step in (40, 50, 60):
        fake_checkpoint(out / "checkpoints", step, run_id)
    (out / "checkpoints" / "latest").write_text("step_00000060\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 61)))
    (out / "train_complete.json").write_text("{}")
    (out / "run_config.yaml").write_text("x: 1\n")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"ev")
    (out / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        (out / "adapter" / name).write_text("a")


def test_a_new_run_is_refused_where_another_run_left_its_outputs(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    with pytest.raises(CheckpointError) as e:
        decide_start(layout(out), None, overwrite=False)
    message = str(e.value)
    assert "holds the outputs of another training run (run aaa)" in message
    assert "--resume auto" in message and "--overwrite" in message and "new output_dir" in message
    assert e.value.same_on_every_rank
    # Nothing was touched.
    assert len(list_checkpoints(str(out / "checkpoints"))) == 3 and (out / "train_complete.json").exists()
    # An empty or new directory is fine, and gets a fresh id.
    start = decide_start(layout(tmp_path / "new"), None, overwrite=False)
    assert start.resume is None and len(start.run_id) == 32


def test_overwrite_deletes_only_what_a_training_run_writes(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    notes = {out / "notes.txt": "mine", out / "raw.jsonl": "{}", out / "checkpoints" / "README": "mine too",
             out / "tensorboard" / "my_plot.png": "png", out / "adapter" / "eval.md": "table"}
    for path, text in notes.items():
        path.write_text(text)
    start = decide_start(layout(out), None, overwrite=True)
    assert start.resume is None and start.run_id != "aaa"
    for path, text in notes.items():
        assert path.read_text() == text, path
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["adapter", "adapter/eval.md", "checkpoints", "checkpoints/README", "notes.txt", "raw.jsonl",
                    "tensorboard", "tensorboard/my_plot.png"], left
    # Directories of ours that hold nothing else go too.
    finished_run(tmp_path / "clean")
    clear_previous_run(layout(tmp_path / "clean"))
    assert [p.name for p in (tmp_path / "clean").iterdir()] == []
    with pytest.raises(CheckpointError, match="--overwrite starts a new run and --resume auto continues one"):
        decide_start(layout(out), "auto", overwrite=True)


def test_resume_auto_continues_this_run_only(tmp_path):
    """Checkpoints of another run id (a directory mixed before ids existed, say) are never resumed."""
    out = tmp_path / "run"
    write_run_record(str(out), "mine", "r")
    fake_checkpoint(out / "checkpoints", 10, "mine")
    fake_checkpoint(out / "checkpoints", 60, "other")
    start = decide_start(layout(out), "auto", overwrite=False)
    assert start.run_id == "mine" and start.step == 10
    with pytest.raises(CheckpointError, match="is a checkpoint of run other, and .* belongs to run mine"):
        decide_start(layout(out), str(out / "checkpoints" / "step_00000060"), overwrite=False)


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in range(1, 9)] + [{"step": 8, "eval/loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')  # a row cut by a crash
    assert truncate_metrics(str(path), 4) == 6
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == rows[:4]
    assert truncate_metrics(str(path), 4) == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "sub/optim_states.pt", "rank_00001.pt"])
def test_every_file_of_a_checkpoint_is_verified(tmp_path, victim, damage):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 4, "r")
    newest = fake_checkpoint(root, 8, "r")
    assert verify_checkpoint(list_checkpoints(str(root))[-1]) is None
    target = newest / victim
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    else:
        target.unlink()
    problem = verify_checkpoint(list_checkpoints(str(root))[-1])
    assert problem is not None and str(target) in problem

    info, warnings = select_checkpoint("auto", str(root), "r")
    assert info.step == 4
    assert len(warnings) == 1 and str(target) in warnings[0] and "damaged and skipped" in warnings[0]
    with pytest.raises(CheckpointError) as e:
        select_checkpoint(str(newest), str(root), "r")
    assert f"--resume {newest}: checkpoint is damaged: {target}" in str(e.value)
    assert "step_00000004" in str(e.value) and "--resume auto" in str(e.value)


def test_a_damaged_completion_marker_is_a_damaged_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 4, "r")
    newest = fake_checkpoint(root, 8, "r")
    marker = newest / COMPLETE
    marker.write_text(marker.read_text()[:40])
    info, warnings = select_checkpoint("auto", str(root), "r")
    assert info.step == 4 and len(warnings) == 1 and f"{marker}: unreadable completion marker" in warnings[0]
    # Nothing intact at all: refused, not a silent fresh start.
    first = root / "step_00000004" / "rank_00000.pt"
    first.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint under"):
        select_checkpoint("auto", str(root), "r")


def test_each_rank_hashes_the_files_it_wrote():
    names = {"mp_rank_00_model_states.pt": 0, "bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt": 3,
             "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1, "rank_00002.pt": 2, "zero_to_fp32.py": 0,
             "run_config.yaml": 0, "rank_00009.pt": 0}  # a rank beyond the world: rank 0 takes it
    assert {n: writer_rank(n, 4) for n in names} == names
