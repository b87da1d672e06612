"""Triton quantization to bitsandbytes' 4-bit format, byte-identical to the vectorized torch path
in peft_kernels.quant.bnb4bit (tests hold both kernels to it exactly):

- ``quantize_4bit``: one pass over the weight: per block of ``blocksize`` flat elements, absmax,
  scaled value, nearest code (a midpoint tie goes to the lower sorted index, as in bnb), nibble
  packing (first element in the high nibble), and a count of non-finite inputs, so the caller
  needs no separate pass (and host synchronization) to refuse NaN / Inf.
- ``quantize_nested``: double quantization of those absmax: minus their mean, blocks of 256,
  nearest entry of bnb's signed 8-bit dynamic map by binary search over its midpoints.

The code tables come from code_search_tables' per-device cache: nothing here copies from or
synchronizes with the host."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.bnb4bit import NESTED_BLOCKSIZE, code_search_tables
from .launch import cdiv, launch


@triton.jit
def _scale_blocks(w, blocks, n, BS: tl.constexpr, NB: tl.constexpr):
    """(values scaled to [-1, 1], absmax) of NB blocks of BS values (fp32, zero past n)."""
    amax = tl.max(tl.abs(w), axis=1)
    # fp32 floor as a tensor: the literal 1e-38 alone is typed fp64 by triton 3.6.
    safe = tl.maximum(amax, tl.full((NB,), 1e-38, tl.float32))
    # Full blocks multiply by the reciprocal; a partial last block divides (bnb's rule). div_rn:
    # IEEE round-to-nearest division (Triton's plain "/" may lower to an approximate one).
    partial = (blocks.to(tl.int64) + 1) * BS > n
    recip = tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), safe)
    scaled = tl.where(partial[:, None], tl.math.div_rn(w, safe[:, None]), w * recip[:, None])
    return tl.minimum(tl.maximum(scaled, -1.0), 1.0), amax


@triton.jit
def _quantize_4bit_kernel(w_ptr, bounds_ptr, order_ptr, packed_ptr, absmax_ptr, nonfinite_ptr, n, n_blocks,
                          BS: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0)
    blocks = pid * NB + tl.arange(0, NB)
    flat = blocks.to(tl.int64)[:, None] * BS + tl.arange(0, BS)[None, :]
    ok = flat < n
    w = tl.load(w_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    bad = tl.sum(tl.sum(((w != w) | (tl.abs(w) == float("inf"))).to(tl.int32), axis=1), axis=0)
    # Masked: thousands of programs adding zeros to one address would serialize at the L2.
    tl.atomic_add(nonfinite_ptr, bad, mask=bad > 0)
    scaled, amax = _scale_blocks(w, blocks, n, BS, NB)
    idx = tl.zeros((NB, BS), dtype=tl.int32)
    for t in tl.static_range(15):
        idx += (scaled > tl.load(bounds_ptr + t)).to(tl.int32)
    code = tl.load(order_ptr + idx).to(tl.uint8)
    hi, lo = tl.split(tl.reshape(code, (NB, BS // 2, 2)))
    byte_idx = blocks.to(tl.int64)[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + byte_idx, (hi << 4) | lo, mask=byte_idx * 2 < n)
    tl.store(absmax_ptr + blocks, amax, mask=blocks < n_blocks)


@triton.jit
def _quantize_nested_kernel(absmax_ptr, offset_ptr, bounds_ptr, order_ptr, q_ptr, absmax2_ptr, n, n_blocks,
                            BS: tl.constexpr, NB: tl.constexpr, STEPS: tl.constexpr):
    pid = tl.program_id(0)
    blocks = pid * NB + tl.arange(0, NB)
    flat = blocks[:, None] * BS + tl.arange(0, BS)[None, :]  # n = weight blocks: far below 2**31
    ok = flat < n
    v = tl.where(ok, tl.load(absmax_ptr + flat, mask=ok, other=0.0) - tl.load(offset_ptr), 0.0)
    scaled, amax = _scale_blocks(v, blocks, n, BS, NB)
    # Count the midpoints below each value: bisection over the 2**STEPS - 1 sorted midpoints.
    below = tl.zeros((NB, BS), dtype=tl.int32)
    for s in tl.static_range(STEPS):
        mid = tl.load(bounds_ptr + below + ((1 << (STEPS - 1 - s)) - 1))
        below += tl.where(mid < scaled, 1 << (STEPS - 1 - s), 0)
    tl.store(q_ptr + flat, tl.load(order_ptr + below).to(tl.uint8), mask=ok)
    tl.store(absmax2_ptr + blocks, amax, mask=blocks < n_blocks)


def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int):
    """(packed uint8 [(n + 1) // 2, 1], absmax fp32 [ceil(n / blocksize)], non-finite count int32
    [1]) of a float tensor's n values, row-major. The count stays on the device: reading it is the
    caller's one synchronization."""
    flat = w.reshape(-1)
    if not flat.is_contiguous():
        raise ValueError("quantize_4bit needs a contiguous weight")
    n = flat.numel()
    n_blocks = cdiv(n, blocksize)
    bounds, order = code_search_tables(quant_type, w.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=w.device)
    nb = max(1, min(16, 4096 // blocksize))
    launch(_quantize_4bit_kernel, (cdiv(n_blocks, nb),), flat, bounds, order, packed, absmax, nonfinite,
           n, n_blocks, BS=blocksize, NB=nb, num_warps=4)
    return packed.unsqueeze(1), absmax, nonfinite


def quantize_nested(absmax: torch.Tensor, offset: torch.Tensor | None = None):
    """bitsandbytes' double quantization of fp32 ``absmax`` [nblocks]: (codes uint8 [nblocks],
    absmax2 fp32 [ceil(nblocks / 256)], offset fp32 scalar, absmax.mean() unless given)."""
    n = absmax.numel()
    n_blocks = cdiv(n, NESTED_BLOCKSIZE)
    bounds, order = code_search_tables("dynamic", absmax.device)
    steps = (bounds.numel() + 1).bit_length() - 1
    assert bounds.numel() == 2**steps - 1, "the bisection needs 2**k - 1 midpoints"
    offset = absmax.mean() if offset is None else offset
    q = torch.empty(n, dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty(n_blocks, dtype=torch.float32, device=absmax.device)
    nb = 4
    launch(_quantize_nested_kernel, (cdiv(n_blocks, nb),), absmax, offset, bounds, order, q, absmax2, n, n_blocks,
           BS=NESTED_BLOCKSIZE, NB=nb, STEPS=steps, num_warps=4)
    return q, absmax2, offset
