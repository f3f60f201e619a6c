"""mixlora_ds: MixLoRA fine-tuning (a mixture of LoRA experts over each layer's frozen FFN) on DeepSpeed.

The public names are imported lazily, so tools that need none of them (the offline data job) do
not pay for importing torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MixLoraConfig", "inject_mixlora", "save_mixlora_adapter", "load_mixlora_adapter"]

_EXPORTS = {
    "MixLoraConfig": "mixlora_ds.config",
    "inject_mixlora": "mixlora_ds.model.inject",
    "save_mixlora_adapter": "mixlora_ds.adapter_io",
    "load_mixlora_adapter": "mixlora_ds.adapter_io",
}

if TYPE_CHECKING:
    from mixlora_ds.adapter_io import load_mixlora_adapter, save_mixlora_adapter
    from mixlora_ds.config import MixLoraConfig
    from mixlora_ds.model.inject import inject_mixlora


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixlora_ds' has no attribute {name!r}")
