"""The product with a frozen quantized weight W [N, K] by windows of W, in plain PyTorch: each
window is decoded (by the format's own decoder) and multiplied by the BLAS, writing column slices
of the output, so the full-precision weight never exists at once. Serves the 4-bit chunked path
(peft_kernels/triton/quant_matmul.py) and the reference products with NF4/FP4 and INT8/INT4 bases
(peft_kernels/reference/quant.py, intq.py).

    transpose=False:  out [M, N] (+)= a [M, K] @ W^T   windows of ``step`` whole rows of W
    transpose=True:   out [M, K] (+)= a [M, N] @ W     windows of ``step`` whole columns of W
"""
from __future__ import annotations

import torch


def window_step(total: int, other: int, align: int, window_elements: int) -> int:
    """Rows (or columns) of W per window: at most ``window_elements`` weights, a multiple of
    ``align``, at least one ``align``."""
    step = max(align, window_elements // max(other, 1) // align * align)
    return min(step, total) if total else 1


@torch.no_grad()
def windowed_matmul(a, decode, shape, step, out, transpose=False, accumulate=False, bias=None):
    """decode(r0, rows, c0, cols) -> the [rows, cols] window of W in a's dtype. ``accumulate``
    adds into ``out`` (it holds an epilogue input); ``bias`` (one value per output column) is
    added once. Returns ``out``. Without autograd: an op kernel (the ops' autograd.Functions
    differentiate it), also where a graph calls the op itself with inputs that require grad (a
    torch.export-ed module), which the out= products refused."""
    N, K = shape
    P = K if transpose else N
    for p0 in range(0, P, step):
        p1 = min(P, p0 + step)
        w = decode(0, N, p0, p1 - p0) if transpose else decode(p0, p1 - p0, 0, K).T
        dst = out[:, p0:p1]
        if accumulate:
            dst.addmm_(a, w)
        elif bias is not None:
            torch.addmm(bias[p0:p1], a, w, out=dst)
        else:
            torch.mm(a, w, out=dst)
    if accumulate and bias is not None:
        out.add_(bias)
    return out
