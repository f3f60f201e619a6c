"""mixlora_ds: MixLoRA fine-tuning (a mixture of LoRA experts over each layer's frozen FFN) on DeepSpeed."""

from mixlora_ds.adapter_io import load_mixlora_adapter, save_mixlora_adapter
from mixlora_ds.config import MixLoraConfig
from mixlora_ds.model.inject import inject_mixlora

__all__ = ["MixLoraConfig", "inject_mixlora", "save_mixlora_adapter", "load_mixlora_adapter"]
__version__ = "0.1.0"
