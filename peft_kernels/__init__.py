"""peft_kernels: fused kernels for parameter-efficient fine-tuning.

Public API (importing never needs a GPU, triton or the compiled extension):
    lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling, dropout_p, training, seed, backend)
    nn.LoRALinear, apply_lora(model, target_modules, r, alpha, dropout)
    info() -> dict of versions, devices and backend availability
    quant_linear(x, qweight, bias), qlora_linear(x, qweight, lora_A, lora_B, bias, *, ...)
    quant.NF4Weight / FP4Weight (bitsandbytes-compatible 4-bit), quant.Int8Weight / Int4Weight
"""
from . import backends, nn, quant
from .apply import apply_lora
from .info import info
from .ops.lora import lora_linear
from .ops.qlora import qlora_linear
from .ops.quant_linear import quant_linear

__version__ = "0.1.0"
__all__ = ["lora_linear", "qlora_linear", "quant_linear", "apply_lora", "info", "nn", "quant", "backends", "__version__"]
