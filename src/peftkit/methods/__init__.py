"""PEFT methods by family. Importing this package registers every method's config."""
from .reparameterized.lora import LoRA

__all__ = ["LoRA"]
