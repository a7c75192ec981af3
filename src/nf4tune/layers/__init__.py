"""Modules built on the 4-bit core: the 4-bit linear layer and LoRA. Knows nothing of training loops."""

from .linear4bit import Linear4bit, Linear16bit, lora_scaling
from .lora import LoraConfig, inject_lora, lora_layers, trainable_parameters

__all__ = ["Linear4bit", "Linear16bit", "LoraConfig", "inject_lora", "lora_layers", "lora_scaling", "trainable_parameters"]
