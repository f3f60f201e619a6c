"""Data layer: prompt templates, offline preparation (tokenize + pack + shard) and the reader.

The reader (PackedDataset, ResumableDistributedSampler, collate_packed) imports torch; import it
from ``mixlora_ds.data.reader`` so that preparation-only code stays free of torch.
"""

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.sample_data import write_sample_data
from mixlora_ds.data.templates import (TASKS, TEMPLATE_VERSION, TaskSpec, format_instruction,
                                       instruction_segments)

__all__ = ["DataError", "TASKS", "TEMPLATE_VERSION", "TaskSpec", "format_instruction",
           "instruction_segments", "write_sample_data"]
