"""Counter-based dropout mask, bit-identical to peft_kernels.triton.rng.

keep[m, k] is a pure function of (seed, m, k), so a kernel regenerates the forward's mask in
backward instead of storing it, and the reference reproduces the kernels' mask exactly.

  key(m)      = mix(mix(m + mix(seed_lo ^ C0)) ^ mix(seed_hi ^ C1))        (per row)
  keep[m, k]  = (mix(k + key(m)) >> 1) >= round(p * 2**31)                  (uint32 arithmetic)

mix is the "lowbias32" integer finaliser (a bijection on uint32 with good avalanche). Rows use
disjoint windows of one bijective stream, so each row's drops are independent of the others'.
"""
import torch

MASK32 = 0xFFFFFFFF
SEED_C0 = 0x9E3779B9
SEED_C1 = 0x85EBCA6B
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for h in [0, 2**32) held in int64, without overflowing int64.
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, MUL1)
    h = h ^ (h >> 15)
    h = _mul32(h, MUL2)
    return h ^ (h >> 16)


def keep_threshold(p: float) -> int:
    """Integer threshold on a 31-bit draw: P(keep) = 1 - threshold / 2**31."""
    return min(int(round(p * 2.0**31)), 2**31 - 1)


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    lo = torch.tensor(seed & MASK32, dtype=torch.int64)
    hi = torch.tensor((seed >> 32) & MASK32, dtype=torch.int64)
    k0 = mix32(lo ^ SEED_C0)
    k1 = mix32(hi ^ SEED_C1)
    return mix32(mix32((rows + k0) & MASK32) ^ k1)


def dropout_keep_mask(seed: int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Bool [rows, cols]: True where the element is kept."""
    r = torch.arange(rows, dtype=torch.int64, device=device)
    c = torch.arange(cols, dtype=torch.int64, device=device)
    keys = row_keys(seed, r).to(device)
    h = mix32((c[None, :] + keys[:, None]) & MASK32)
    return (h >> 1) >= keep_threshold(p)
