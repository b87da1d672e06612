"""Triton backend of qlora_linear (and of dora_linear's qdora ops) over a frozen INT8 / INT4 base
(Int8Weight / Int4Weight).

The LoRA work is triton.lora's adapter kernels, with the same fusions as over a bf16 or 4-bit base:
the dropout mask regenerated from the seed (never stored), the up-projection written once as the
base product's epilogue input, the adapter's part of dx in one pass. The base product runs by
windows of decoded weight on cuBLAS (reference/intq.py), accumulating into that epilogue input:
there is no fused integer-decode GEMM yet.
"""
from __future__ import annotations

from ..reference import intq
from . import dora, lora


def qlora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """(y [M, N] in x.dtype, u [M, r] fp32); same contract as reference.intq.qlora_forward."""
    if lora.degenerate(x, lora_B):
        return intq.qlora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, bias, scaling, 0.0, None)
    c, u = lora.adapter_forward(x, lora_A, lora_B, bias, scaling, dropout_p, seed)  # c = bias + s u B^T
    return intq.forward(x, tensors, fmt, group_size, shape, None, out=c), u


def qlora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx):
    """(dx [M, K] or an empty tensor, d lora_A, d lora_B)."""
    if lora.degenerate(x, lora_B):
        return intq.qlora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, scaling, 0.0,
                                   None, need_dx)
    d, grad_A, grad_B = lora.adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    if need_dx:
        intq.backward(grad_y, tensors, fmt, group_size, shape, out=d)
    return d, grad_A, grad_B


def qdora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    """triton.dora's forward with the INT windows as the base product: (y, u, w)."""
    if lora.degenerate(x, lora_B):
        return intq.qdora_forward(x, tensors, fmt, group_size, shape, lora_A, lora_B, mn, bias, scaling, 0.0, None)

    def base(inp, c, new):
        return intq.forward(inp, tensors, fmt, group_size, shape, None, out=c.clone() if new else c)
    return dora.forward_with(base, x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def qdora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                   need_dx):
    """(dx or an empty tensor, d lora_A, d lora_B, d mn fp32)."""
    if lora.degenerate(x, lora_B):
        return intq.qdora_backward(grad_y, x, tensors, fmt, group_size, shape, lora_A, lora_B, u, w, mn, scaling,
                                   0.0, None, need_dx)

    def base_t(g, c):
        return intq.backward(g, tensors, fmt, group_size, shape, out=c)
    return dora.backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)
