"""Triton matmul over a bitsandbytes-format 4-bit weight (NF4/FP4), decoded tile by tile in
registers: the full-precision weight is never written to memory.

    out [M, P] = a [M, Q] @ B [Q, P] (+ c)     where, for the frozen weight W [N, K],
        transpose=False:  B = W^T   (forward   y  = x  @ W^T,  Q = K, P = N)
        transpose=True:   B = W     (backward  dx = dY @ W,    Q = N, P = K)

Each element decodes exactly as bitsandbytes' dequantize does: fp32(code[idx] * absmax[block]),
absmax = fp32(code2[q] * absmax2[block // 256]) + offset when double-quantized (compiled without
FMA contraction so the two roundings match), then cast to a's dtype for the tensor-core dot.
This first version gathers codes and scales per element; tuning it (vectorized nibble loads,
per-tile scale reuse) is measured work still to do on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import quant as reference
from . import lora
from .lora import _mm


@triton.jit
def _decode_4bit(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, blocksize, flat, mask,
                 NESTED: tl.constexpr):
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0)
    nibble = tl.where((flat % 2) == 0, byte >> 4, byte & 0xF).to(tl.int32)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // 256, mask=mask,
                                                                        other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _matmul_4bit_kernel(
    a_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, c_ptr, bias_ptr, out_ptr,
    M, P, Q, K_w,
    stride_am, stride_aq, stride_cm, stride_cp, stride_om, stride_op,
    blocksize,
    TRANSPOSE: tl.constexpr, NESTED: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order so neighbouring programs share rows of a and tiles of W in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_p = tl.cdiv(P, BP)
    group = GROUP_M * tiles_p
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_p = (pid % group) // size_m

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_p * BP + tl.arange(0, BP)
    row_ok = rows < M
    col_ok = cols < P
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for q0 in range(0, Q, BQ):
        qs = q0 + tl.arange(0, BQ)
        q_ok = qs < Q
        a = tl.load(a_ptr + rows64[:, None] * stride_am + qs[None, :] * stride_aq,
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        qs64 = qs.to(tl.int64)
        if TRANSPOSE:
            flat = qs64[:, None] * K_w + cols64[None, :]  # B[q, p] = W[q, p]
        else:
            flat = cols64[None, :] * K_w + qs64[:, None]  # B[q, p] = W[p, q]
        b = _decode_4bit(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, blocksize, flat,
                         q_ok[:, None] & col_ok[None, :], NESTED)
        acc = _mm(a, b.to(a.dtype), acc, IEEE)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cp, mask=tile_ok,
                       other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_op, acc.to(out_ptr.dtype.element_ty),
             mask=tile_ok)


DEFAULT_TILES = (128, 128, 64, 8)  # BM, BP, BQ, num_warps


def matmul_4bit(a, packed, absmax, code, absmax2, code2, offset, blocksize, shape, c=None, bias=None,
                transpose=False, tiles=None):
    """a [M, K] @ W^T -> [M, N] (transpose=False) or a [M, N] @ W -> [M, K] (transpose=True), plus
    c (same shape as the result; the result is written into c when given) and bias (one value
    per result column). W [N, K] = ``shape`` is described by the bitsandbytes 4-bit parts
    (peft_kernels.quant.bnb4bit)."""
    N, K = shape
    M, Q = a.shape
    P = K if transpose else N
    if Q != (N if transpose else K):
        raise ValueError(f"matmul_4bit: a has {Q} columns, expected {N if transpose else K}")
    out = c if c is not None else torch.empty((M, P), dtype=a.dtype, device=a.device)
    if M == 0 or P == 0:
        return out
    bm, bp, bq, warps = tiles or DEFAULT_TILES
    nested = absmax2 is not None
    grid = (triton.cdiv(M, bm) * triton.cdiv(P, bp),)
    _matmul_4bit_kernel[grid](
        a, packed, absmax, absmax2 if nested else absmax, code, code2 if nested else code,
        offset if nested else code, out, bias if bias is not None else out, out,
        M, P, Q, K,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), out.stride(0), out.stride(1),
        blocksize,
        TRANSPOSE=transpose, NESTED=nested, HAS_C=c is not None, HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32,
        BM=bm, BP=bp, BQ=bq, GROUP_M=8, num_warps=warps, enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------- op backends
# Signatures mirror peft_kernels.reference.quant; ``qweight`` is (packed, absmax, code, absmax2,
# code2, offset) of Bnb4bitWeight.parts(); blocksize and shape travel as ints.


def quant_linear_forward(x, qweight, blocksize, shape, bias):
    packed, absmax, code, absmax2, code2, offset = qweight
    return matmul_4bit(x, packed, absmax, code, absmax2, code2, offset, blocksize, shape, bias=bias)


def quant_linear_backward(grad_y, qweight, blocksize, shape):
    packed, absmax, code, absmax2, code2, offset = qweight
    return matmul_4bit(grad_y, packed, absmax, code, absmax2, code2, offset, blocksize, shape, transpose=True)


def qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """The LoRA adapter kernels of triton.lora with the 4-bit matmul as the base product."""
    if lora.degenerate(x, lora_B):
        return reference.qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, 0.0,
                                       None)
    c, u = lora.adapter_forward(x, lora_A, lora_B, bias, scaling, dropout_p, seed)
    packed, absmax, code, absmax2, code2, offset = qweight
    return matmul_4bit(x, packed, absmax, code, absmax2, code2, offset, blocksize, shape, c=c), u


def qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx):
    if lora.degenerate(x, lora_B):
        return reference.qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling,
                                        0.0, None, need_dx)
    d, grad_A, grad_B = lora.adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    if need_dx:
        packed, absmax, code, absmax2, code2, offset = qweight
        matmul_4bit(grad_y, packed, absmax, code, absmax2, code2, offset, blocksize, shape, c=d, transpose=True)
    return d, grad_A, grad_B
