// The dropout mask of peft_kernels/reference/rng.py, bit for bit: a pure function of (seed, row,
// column), regenerated wherever it is needed and never stored. Shared by every CUDA kernel (and
// by the CPU emulator's build of them, tests/cuda_emu).
#pragma once
#include <cmath>
#include <cstdint>

#include "device_compat.cuh"

namespace peft_kernels {
namespace mask {

// lowbias32
PK_DEVICE uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

// The per-row key: one hash per row, then one per element (keep).
PK_DEVICE uint32_t row_key(int64_t seed, uint32_t m) {
  const uint32_t k0 = mix32(static_cast<uint32_t>(seed & 0xFFFFFFFFLL) ^ 0x9E3779B9u);
  const uint32_t k1 = mix32(static_cast<uint32_t>((seed >> 32) & 0xFFFFFFFFLL) ^ 0x85EBCA6Bu);
  return mix32(mix32(m + k0) ^ k1);
}

PK_DEVICE bool keep(uint32_t key, uint32_t k, uint32_t threshold) { return (mix32(k + key) >> 1) >= threshold; }

// reference/rng.py keep_threshold: min(round(p * 2^31), 2^31 - 1) with Python's round (half to
// even, which nearbyint does in the default rounding mode), from the double p: a float p would
// move the threshold (0.05f * 2^31 rounds to 107374184, 0.05 to 107374182) and the mask with it.
inline uint32_t keep_threshold(double p) {
  const double r = std::nearbyint(p * 2147483648.0);
  return r > 2147483647.0 ? 2147483647u : static_cast<uint32_t>(r);
}

}  // namespace mask
}  // namespace peft_kernels
