"""lora_fwd / lora_bwd on the CUDA C++ extension (csrc/lora.cpp, csrc/lora_kernels.cu).

Same signatures as peft_kernels.triton.lora; the extension validates every tensor again with
TORCH_CHECK before launching anything.
"""
from __future__ import annotations

import torch

from .. import cuda


def _ops():
    if cuda.load() is None:
        raise RuntimeError(f"peft_kernels: backend 'cuda' unavailable: {cuda.reason()}")
    return torch.ops.peft_kernels_cuda


def _c(t):
    return None if t is None else t.contiguous()


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] | None, seed int64 [1] |
    None. Returns (y [M, N] in x.dtype, u [M, r] fp32)."""
    y, u = _ops().lora_fwd(_c(x), _c(weight), _c(lora_A), _c(lora_B), _c(bias), float(scaling), float(dropout_p),
                           seed)
    return y, u


def lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """Returns (dx [M, K] or an empty tensor, d lora_A [r, K], d lora_B [N, r])."""
    dx, ga, gb = _ops().lora_bwd(_c(grad_y), _c(x), _c(weight), _c(lora_A), _c(lora_B), _c(u), float(scaling),
                                 float(dropout_p), seed, bool(need_dx))
    return dx, ga, gb
