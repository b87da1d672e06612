"""Frozen INT8 / INT4 base weights (peft_kernels.quant.Int8Weight / Int4Weight) times activations,
by windows (peft_kernels.reference.windowed): a window of at most WINDOW_ELEMENTS weights is
decoded (the exact dequantize() values) and multiplied by the BLAS, so the full-precision weight
never exists at once; on a GPU the products run on cuBLAS. This is quant_linear's
only backend for these formats (there is no fused INT8/INT4 decode kernel yet): "auto" resolves to it
everywhere; the Triton LoRA path (peft_kernels/triton/intq_lora.py) adds its adapter kernels on top.

    forward   y  [M, N] (+)= x  [M, K] @ W^T   windows of whole rows of W
    backward  dx [M, K] (+)= dY [M, N] @ W     windows of whole columns (multiples of the group)

qlora_* / qdora_*: the LoRA and DoRA ops over these bases, plain PyTorch with the same windowed
products (the reference and CPU path of qlora_linear / dora_linear with an Int8Weight / Int4Weight).
"""
from __future__ import annotations

import torch

from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight
from . import dora, lora
from .windowed import window_step, windowed_matmul

WINDOW_ELEMENTS = 4 * 1024 * 1024


def weight_of(fmt: str, tensors, group_size: int, dtype: torch.dtype):
    if fmt == "int8":
        return Int8Weight(tensors[0], tensors[1], dtype)
    if fmt == "int4":
        return Int4Weight(tensors[0], tensors[1], tensors[2], group_size, dtype)
    raise ValueError(f"unknown integer weight format {fmt!r}")


def _product(a, tensors, fmt, group_size, shape, transpose, out, bias=None):
    N, K = shape
    w = weight_of(fmt, tensors, group_size, a.dtype)
    accumulate = out is not None
    if out is None:
        out = torch.empty((a.shape[0], K if transpose else N), dtype=a.dtype, device=a.device)
    step = (window_step(K, N, group_size if fmt == "int4" else 1, WINDOW_ELEMENTS) if transpose
            else window_step(N, K, 1, WINDOW_ELEMENTS))
    decode = lambda r0, rows, c0, cols: w.decode_window(r0, rows, c0, cols, a.dtype)  # noqa: E731
    return windowed_matmul(a, decode, shape, step, out, transpose=transpose, accumulate=accumulate, bias=bias)


def forward(x, tensors, fmt, group_size, shape, bias, out=None):
    """x @ W^T + bias; with ``out`` given, added into it (it holds an epilogue input)."""
    return _product(x, tensors, fmt, group_size, shape, False, out, bias)


def backward(grad_y, tensors, fmt, group_size, shape, out=None):
    """dY @ W; with ``out`` given, added into it."""
    return _product(grad_y, tensors, fmt, group_size, shape, True, out)


def _bases(tensors, fmt, group_size, shape):
    """base / base_t of reference.lora's *_with functions: the windowed products."""
    def base(a, bias):
        return forward(a, tensors, fmt, group_size, shape, bias)

    def base_t(g, c):
        return backward(g, tensors, fmt, group_size, shape, out=c)
    return base, base_t


def qlora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    base = _bases(tensors, fmt, group_size, shape)[0]
    return lora.lora_forward_with(base, x, lora_A, lora_B, bias, scaling, dropout_p, seed)


def qlora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx):
    base_t = _bases(tensors, fmt, group_size, shape)[1]
    return lora.lora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def qdora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    base = _bases(tensors, fmt, group_size, shape)[0]
    return dora.dora_forward_with(base, x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def qdora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                   need_dx):
    base_t = _bases(tensors, fmt, group_size, shape)[1]
    return dora.dora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)
