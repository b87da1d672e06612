"""One-pass Triton quantization to bitsandbytes' 4-bit format: per block of ``blocksize`` flat
elements, absmax, scaled value, nearest code (a midpoint tie goes to the lower sorted index, as in
bnb), and nibble packing (first element in the high nibble) — the same bytes as the vectorized
torch path in peft_kernels.quant.bnb4bit, which tests hold it to exactly."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch


@triton.jit
def _quantize_4bit_kernel(w_ptr, bounds_ptr, order_ptr, packed_ptr, absmax_ptr, n, n_blocks,
                          BS: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0)
    blocks = pid * NB + tl.arange(0, NB)
    flat = blocks.to(tl.int64)[:, None] * BS + tl.arange(0, BS)[None, :]
    ok = flat < n
    w = tl.load(w_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(w), axis=1)
    # fp32 floor as a tensor: the literal 1e-38 alone is typed fp64 by triton 3.6.
    safe = tl.maximum(amax, tl.full((NB,), 1e-38, tl.float32))
    # Full blocks multiply by the reciprocal; a partial last block divides (bnb's rule). div_rn:
    # IEEE round-to-nearest division (Triton's plain "/" may lower to an approximate one).
    partial = (blocks.to(tl.int64) + 1) * BS > n
    recip = tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), safe)
    scaled = tl.where(partial[:, None], tl.math.div_rn(w, safe[:, None]), w * recip[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    idx = tl.zeros((NB, BS), dtype=tl.int32)
    for t in tl.static_range(15):
        idx += (scaled > tl.load(bounds_ptr + t)).to(tl.int32)
    code = tl.load(order_ptr + idx).to(tl.uint8)
    hi, lo = tl.split(tl.reshape(code, (NB, BS // 2, 2)))
    byte_idx = blocks.to(tl.int64)[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + byte_idx, (hi << 4) | lo, mask=byte_idx * 2 < n)
    tl.store(absmax_ptr + blocks, amax, mask=blocks < n_blocks)


def quantize_4bit(w: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n + 1) // 2, 1], absmax fp32 [n_blocks]) of a contiguous-able float tensor."""
    flat = w.reshape(-1)
    n = flat.numel()
    n_blocks = cdiv(n, blocksize)
    order = torch.argsort(code.cpu(), stable=True).to(w.device)  # same tie order as the torch path
    sorted_code = code[order]
    bounds = ((sorted_code[:-1] + sorted_code[1:]) / 2).contiguous()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    nb = max(1, min(16, 4096 // blocksize))
    launch(
        _quantize_4bit_kernel, (cdiv(n_blocks, nb),),
        flat, bounds, order.to(torch.int32).contiguous(), packed, absmax, n, n_blocks, BS=blocksize, NB=nb,
        num_warps=4,
    )
    return packed.unsqueeze(1), absmax
