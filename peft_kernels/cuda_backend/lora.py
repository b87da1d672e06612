"""lora_fwd / lora_bwd on the CUDA C++ extension (csrc/lora.cpp): cuBLAS for the big products and
the kernels of csrc/lora_kernels.cu for the LoRA work, or, for few tokens where the size rules
below allow, one tensor-core kernel each way (csrc/lora_small_m.cuh, csrc/lora_small_m_bwd.cuh).

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


# The single-kernel forward and backward for few tokens (csrc/lora_small_m.cuh, lora_small_m_bwd.cuh:
# tensor cores, split K, the LoRA terms in the same launch) run for M <= SMALL_M_MAX_M /
# SMALL_M_BWD_MAX_M where they apply (small_m_reason). 0 = off: they have run only in the CPU
# emulator (tests/test_cuda_small_m_emulated.py) and compiled for sm_80 / sm_90; each becomes the
# default once a GPU benchmark (bench_lora_backends.py, rows "cuda small-M fwd" / "cuda small-M
# fwd+bwd") shows it beating the cuBLAS-based path. At most 64 (the kernels' limit).
SMALL_M_MAX_M = 0
SMALL_M_BWD_MAX_M = 0
SMALL_M_LIMIT = 64  # the kernel's largest M (csrc/lora_kernels.h kSmallMMaxM)
SMALL_M_MAX_RANK = 64


def common_reason(M, dtype, rank, max_m, knob) -> str | None:
    """What every single-kernel path needs: 1 <= M <= max_m (its size rule ``knob``, capped at the
    kernels' limit), 16-bit activations, r <= SMALL_M_MAX_RANK; None when met."""
    max_m = min(max_m, SMALL_M_LIMIT)
    if not 1 <= M <= max_m:
        return f"M = {M} outside 1..{max_m} ({knob})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype}: fp16 / bf16 only (tensor cores)"
    if rank > SMALL_M_MAX_RANK:
        return f"rank {rank} > {SMALL_M_MAX_RANK}"
    return None


def small_m_reason(x, weight, lora_A, max_m=None) -> str | None:
    """None when the single-kernel forward takes these (contiguous) inputs, else why not."""
    M, K = x.shape
    why = common_reason(M, x.dtype, lora_A.shape[0], SMALL_M_MAX_M if max_m is None else max_m, "SMALL_M_MAX_M")
    if why is not None:
        return why
    if K == 0 or K % 8 or weight.shape[0] == 0:
        return f"in_features {K} not a positive multiple of 8, or no out_features"
    if any(t.data_ptr() % 16 for t in (x, weight, lora_A)):
        return "x, weight or lora_A not 16-byte aligned"
    return None


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] | None, seed int64 [1] |
    None. Returns (y [M, N] in x.dtype, u [M, r] fp32)."""
    x, weight, lora_A = _c(x), _c(weight), _c(lora_A)
    fwd = _ops().lora_fwd_small_m if small_m_reason(x, weight, lora_A) is None else _ops().lora_fwd
    y, u = fwd(x, weight, lora_A, _c(lora_B), _c(bias), float(scaling), float(dropout_p), seed)
    return y, u


def small_m_bwd_reason(grad_y, weight, lora_A, max_m=None) -> str | None:
    """None when the single-kernel backward takes these (contiguous) inputs, else why not."""
    (M, N), K = grad_y.shape, weight.shape[1]
    why = common_reason(M, grad_y.dtype, lora_A.shape[0], SMALL_M_BWD_MAX_M if max_m is None else max_m,
                        "SMALL_M_BWD_MAX_M")
    if why is not None:
        return why
    if K == 0 or K % 8 or N == 0 or N % 8:
        return f"in_features {K} / out_features {N} not positive multiples of 8"
    if any(t.data_ptr() % 16 for t in (grad_y, weight)):
        return "grad_y or weight not 16-byte aligned"
    return None


def lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """Returns (dx [M, K] or an empty tensor, d lora_A [r, K], d lora_B [N, r])."""
    grad_y, weight = _c(grad_y), _c(weight)
    bwd = _ops().lora_bwd_small_m if small_m_bwd_reason(grad_y, weight, lora_A) is None else _ops().lora_bwd
    dx, ga, gb = bwd(grad_y, _c(x), weight, _c(lora_A), _c(lora_B), _c(u), float(scaling), float(dropout_p), seed,
                     bool(need_dx))
    return dx, ga, gb
