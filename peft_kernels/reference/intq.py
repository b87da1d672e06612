"""Frozen INT8 / INT4 base weights (peft_kernels.quant.Int8Weight / Int4Weight) times activations,
by windows (peft_kernels.reference.windowed): a window of at most WINDOW_ELEMENTS weights is
decoded (the exact dequantize() values) and multiplied by the BLAS, so the full-precision weight
never exists at once; on a GPU the products run on cuBLAS. This is quant_linear's
only backend for these formats (there is no fused INT8/INT4 decode kernel yet): "auto" resolves to it
everywhere; the Triton LoRA path (peft_kernels/triton/intq_lora.py) adds its adapter kernels on top.

    forward   y  [M, N] (+)= x  [M, K] @ W^T   windows of whole rows of W
    backward  dx [M, K] (+)= dY [M, N] @ W     windows of whole columns (multiples of the group)

qlora_forward / qlora_backward: the LoRA op over these bases, plain PyTorch (the reference and CPU
path of qlora_linear with an Int8Weight / Int4Weight).
"""
from __future__ import annotations

import torch

from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight
from . import dora, lora
from .windowed import windowed_matmul

WINDOW_ELEMENTS = 4 * 1024 * 1024


def weight_of(fmt: str, tensors, group_size: int, dtype: torch.dtype):
    if fmt == "int8":
        return Int8Weight(tensors[0], tensors[1], dtype)
    if fmt == "int4":
        return Int4Weight(tensors[0], tensors[1], tensors[2], group_size, dtype)
    raise ValueError(f"unknown integer weight format {fmt!r}")


def _step(total: int, other: int, align: int) -> int:
    step = max(align, WINDOW_ELEMENTS // max(other, 1) // align * align)
    return min(step, total) if total else 1


def _product(a, tensors, fmt, group_size, shape, transpose, out, bias=None):
    N, K = shape
    w = weight_of(fmt, tensors, group_size, a.dtype)
    accumulate = out is not None
    if out is None:
        out = torch.empty((a.shape[0], K if transpose else N), dtype=a.dtype, device=a.device)
    step = _step(K, N, group_size if fmt == "int4" else 1) if transpose else _step(N, K, 1)
    decode = lambda r0, rows, c0, cols: w.decode_window(r0, rows, c0, cols, a.dtype)  # noqa: E731
    return windowed_matmul(a, decode, shape, step, out, transpose=transpose, accumulate=accumulate, bias=bias)


def forward(x, tensors, fmt, group_size, shape, bias, out=None):
    """x @ W^T + bias; with ``out`` given, added into it (it holds an epilogue input)."""
    return _product(x, tensors, fmt, group_size, shape, False, out, bias)


def backward(grad_y, tensors, fmt, group_size, shape, out=None):
    """dY @ W; with ``out`` given, added into it."""
    return _product(grad_y, tensors, fmt, group_size, shape, True, out)


def qlora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    w = weight_of(fmt, tensors, group_size, x.dtype).dequantize(x.dtype)
    return lora.lora_forward(x, w, lora_A, lora_B, bias, scaling, dropout_p, seed)


def qlora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx):
    w = weight_of(fmt, tensors, group_size, x.dtype).dequantize(x.dtype) if need_dx else None
    return lora.lora_backward(grad_y, x, w, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def qdora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    w = weight_of(fmt, tensors, group_size, x.dtype).dequantize(x.dtype)
    return dora.dora_forward(x, w, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def qdora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                   need_dx):
    weight = weight_of(fmt, tensors, group_size, x.dtype).dequantize(x.dtype) if need_dx else None
    return dora.dora_backward(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)
