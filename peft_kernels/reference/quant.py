"""Linear layers over a frozen 4-bit (bitsandbytes-format) weight, in plain PyTorch: the weight
is dequantized (bnb's exact rule) and the dense reference runs. CPU path and test oracle."""
import torch

from ..quant.bnb4bit import dequantize_parts
from . import dora, lora


def _weight(qweight, blocksize, shape, dtype):
    packed, absmax, code, absmax2, code2, offset = qweight
    return dequantize_parts(packed, absmax, code, absmax2, code2, offset, blocksize, shape, dtype)


def quant_linear_forward(x, qweight, blocksize, shape, bias):
    return torch.nn.functional.linear(x, _weight(qweight, blocksize, shape, x.dtype), bias)


def quant_linear_backward(grad_y, qweight, blocksize, shape):
    return grad_y @ _weight(qweight, blocksize, shape, grad_y.dtype)


def qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    w = _weight(qweight, blocksize, shape, x.dtype)
    return lora.lora_forward(x, w, lora_A, lora_B, bias, scaling, dropout_p, seed)


def qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx):
    w = _weight(qweight, blocksize, shape, x.dtype) if need_dx else None
    return lora.lora_backward(grad_y, x, w, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def qdora_forward(x, qweight, blocksize, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    w = _weight(qweight, blocksize, shape, x.dtype)
    return dora.dora_forward(x, w, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def qdora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                   need_dx):
    weight = _weight(qweight, blocksize, shape, x.dtype) if need_dx else None
    return dora.dora_backward(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)
