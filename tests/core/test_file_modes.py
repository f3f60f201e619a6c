"""Written files follow the umask like ``open``/``mkdir`` do (a shared run stays readable)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter
from mixlora_ds.utils.atomic import atomic_directory, atomic_write_text
from tests.core.tiny_models import randomize_adapter, targets_for, tiny_model

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): mode(p) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_helpers_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        atomic_write_text(tmp_path / "config.json", "{}\n")
        with atomic_directory(tmp_path / "dir") as tmp:
            (tmp / "inner.txt").write_text("x")
    assert mode(tmp_path / "config.json") == file_mode
    assert mode(tmp_path / "dir") == dir_mode
    assert mode(tmp_path / "dir" / "inner.txt") == file_mode


def test_adapter_and_config_files_are_readable_by_others_under_umask_022(tmp_path):
    model = tiny_model("llama")
    config = MixLoraConfig(r=4, lora_alpha=8, num_experts=2, target_modules=targets_for("llama"))
    inject_mixlora(model, config)
    randomize_adapter(model)
    with umask(0o022):
        save_mixlora_adapter(model, tmp_path / "adapter")
        config.to_json(tmp_path / "mixlora_config.json")
    found = modes_under(tmp_path / "adapter")
    assert found == {k: (0o755 if k == "." else 0o644) for k in found}, found
    assert mode(tmp_path / "mixlora_config.json") == 0o644


def test_make_base_directory_is_readable_by_others_under_umask_022(tmp_path):
    out = tmp_path / "base"
    code = ("import os, sys; os.umask(0o022); sys.argv[1:] = ['--model-config', 'tiny', '--out', sys.argv[1]]; "
            "import runpy; runpy.run_path('launch/make_base.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    found = modes_under(out)
    assert "config.json" in found and "model.safetensors" in found
    assert found == {k: (0o755 if k == "." else 0o644) for k in found}, found
