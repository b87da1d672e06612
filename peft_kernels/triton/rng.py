"""Counter-based dropout mask inside kernels; bit-identical to peft_kernels.reference.rng
(see there for the definition). uint32 arithmetic wraps, which is what the hash relies on."""
import triton
import triton.language as tl


@triton.jit
def mix32(h):
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def row_keys(seed_ptr, rows):
    """uint32 key per row; ``rows`` is a block of int row indices."""
    seed = tl.load(seed_ptr)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = mix32(lo ^ 0x9E3779B9)
    k1 = mix32(hi ^ 0x85EBCA6B)
    return mix32(mix32(rows.to(tl.uint32) + k0) ^ k1)


@triton.jit
def keep_mask(row_key, cols, threshold):
    """row_key [BM, 1] uint32, cols [1, BK] int -> bool [BM, BK], True where kept."""
    h = mix32(cols.to(tl.uint32) + row_key)
    return (h >> 1).to(tl.int32) >= threshold
