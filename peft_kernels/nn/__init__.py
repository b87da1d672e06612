"""Drop-in modules: they hold parameters and call one functional op each."""
from .lora import LoRALinear

__all__ = ["LoRALinear"]
