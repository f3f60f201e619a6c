"""Data layer: prompt templates, offline preparation (tokenize + pack + shard) and the reader.

The reader (PackedDataset, ResumableDistributedSampler, collate_packed) imports torch; import it
from ``mixlora_ds.data.reader`` so that preparation-only code stays free of torch.
"""

from typing import Any

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.templates import (TASKS, TEMPLATE_VERSION, TaskSpec, format_instruction,
                                       instruction_segments)

__all__ = ["DataError", "TASKS", "TEMPLATE_VERSION", "TaskSpec", "format_instruction",
           "instruction_segments", "write_sample_data"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m mixlora_ds.data.sample_data` runs the module fresh.
    if name == "write_sample_data":
        from mixlora_ds.data.sample_data import write_sample_data

        return write_sample_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
