"""Linear layers over a frozen 4-bit (bitsandbytes-format) weight, in plain PyTorch: the CPU path
and the test oracle. The base products run by windows of whole rows of W: each window is decoded
with bnb's exact rule (quant.bnb4bit.decode_flat_parts: rows are one contiguous range of the
packed bytes) and multiplied by the BLAS, so the full-precision weight never exists at once (at
most WINDOW_ELEMENTS decoded weights). Forward, a window gives a column slice of x·Wᵀ
(reference.windowed); dX = dY·W sums the windows' dY[:, rows]·W[rows] (in fp32 for fp16/bf16).
The LoRA and DoRA work is reference.lora's / reference.dora's over those products.
"""
import torch

from ..quant.bnb4bit import decode_flat_parts
from . import dora, lora
from .windowed import window_step, windowed_matmul

WINDOW_ELEMENTS = 4 * 1024 * 1024


def _product(a, qweight, blocksize, shape, transpose, out=None, bias=None):
    """a @ W.T [M, N] (transpose=False, + bias) or a @ W [M, K] (transpose=True); added into
    ``out`` when given."""
    N, K = shape
    step = window_step(N, K, 1, WINDOW_ELEMENTS)

    def rows_of_w(r0, rows, dtype):
        return decode_flat_parts(*qweight, blocksize, r0 * K, rows * K, dtype).view(rows, K)
    if not transpose:
        accumulate = out is not None
        if out is None:
            out = torch.empty((a.shape[0], N), dtype=a.dtype, device=a.device)
        return windowed_matmul(a, lambda r0, rows, c0, cols: rows_of_w(r0, rows, a.dtype), shape, step, out,
                               accumulate=accumulate, bias=bias)
    acc = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    total = torch.zeros((a.shape[0], K), dtype=acc, device=a.device)
    for r0 in range(0, N, step):
        rows = min(step, N - r0)
        total.addmm_(a[:, r0:r0 + rows].to(acc), rows_of_w(r0, rows, acc))
    if out is None:
        return total.to(a.dtype)
    return out.add_(total)


def _bases(qweight, blocksize, shape):
    """base / base_t of reference.lora's *_with functions: the windowed products."""
    def base(a, bias):
        return _product(a, qweight, blocksize, shape, False, bias=bias)

    def base_t(g, c):
        return _product(g, qweight, blocksize, shape, True, out=c)
    return base, base_t


def quant_linear_forward(x, qweight, blocksize, shape, bias):
    return _product(x, qweight, blocksize, shape, False, bias=bias)


def quant_linear_backward(grad_y, qweight, blocksize, shape):
    return _product(grad_y, qweight, blocksize, shape, True)


def qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    base = _bases(qweight, blocksize, shape)[0]
    return lora.lora_forward_with(base, x, lora_A, lora_B, bias, scaling, dropout_p, seed)


def qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx):
    base_t = _bases(qweight, blocksize, shape)[1]
    return lora.lora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def qdora_forward(x, qweight, blocksize, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    base = _bases(qweight, blocksize, shape)[0]
    return dora.dora_forward_with(base, x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def qdora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                   need_dx):
    base_t = _bases(qweight, blocksize, shape)[1]
    return dora.dora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)
