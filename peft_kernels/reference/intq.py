"""Frozen INT8 / INT4 base weights (peft_kernels.quant.Int8Weight / Int4Weight) times activations,
by windows: a window of at most WINDOW_ELEMENTS weights is decoded (the exact dequantize() values)
and multiplied by the BLAS, window after window, writing column slices of the output. So the
full-precision weight never exists at once; on a GPU the products run on cuBLAS. This is the op's
only backend so far (there is no fused INT8/INT4 kernel yet): "auto" resolves to it everywhere.

    forward   y  [M, N] = x  [M, K] @ W^T   windows of whole rows of W
    backward  dx [M, K] = dY [M, N] @ W     windows of whole columns (multiples of the group)
"""
from __future__ import annotations

import torch

from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight

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


def forward(x, tensors, fmt, group_size, shape, bias):
    N, K = shape
    w = weight_of(fmt, tensors, group_size, x.dtype)
    out = torch.empty((x.shape[0], N), dtype=x.dtype, device=x.device)
    step = _step(N, K, 1)
    for r0 in range(0, N, step):
        rows = min(step, N - r0)
        win = w.decode_window(r0, rows, 0, K, x.dtype)
        if bias is not None:
            torch.addmm(bias[r0:r0 + rows], x, win.T, out=out[:, r0:r0 + rows])
        else:
            torch.mm(x, win.T, out=out[:, r0:r0 + rows])
    return out


def backward(grad_y, tensors, fmt, group_size, shape):
    N, K = shape
    w = weight_of(fmt, tensors, group_size, grad_y.dtype)
    out = torch.empty((grad_y.shape[0], K), dtype=grad_y.dtype, device=grad_y.device)
    step = _step(K, N, group_size if fmt == "int4" else 1)
    for c0 in range(0, K, step):
        cols = min(step, K - c0)
        torch.mm(grad_y, w.decode_window(0, N, c0, cols, grad_y.dtype), out=out[:, c0:c0 + cols])
    return out
