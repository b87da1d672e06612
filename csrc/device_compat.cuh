// The few device primitives the tensor-core kernels use, behind one small interface, so that the
// same kernel source compiles with nvcc for the GPU and with a host C++ compiler against the
// CPU emulator of tests/cuda_emu/emu.h (CI has no GPU; the emulator runs every thread of a block
// as a host thread and is how those kernels are tested there).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define PK_DEVICE __device__ __forceinline__
#else
#ifndef PEFT_KERNELS_CUDA_EMULATOR
#error "device_compat.cuh needs nvcc, or tests/cuda_emu/emu.h included first"
#endif
#define PK_DEVICE inline
#endif

namespace peft_kernels {
namespace dev {

#ifdef __CUDACC__
using f16 = __half;
using bf16 = __nv_bfloat16;
using u32x4 = uint4;

PK_DEVICE float to_f(float v) { return v; }
PK_DEVICE float to_f(f16 v) { return __half2float(v); }
PK_DEVICE float to_f(bf16 v) { return __bfloat162float(v); }
template <typename T> PK_DEVICE T from_f(float v);
template <> PK_DEVICE float from_f<float>(float v) { return v; }
template <> PK_DEVICE f16 from_f<f16>(float v) { return __float2half_rn(v); }
template <> PK_DEVICE bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }

// Two values rounded to T and packed as an mma operand's k pair (a in the low half): one
// cvt.rn.{bf16x2,f16x2}.f32 instead of two conversions and a permute.
template <typename T> PK_DEVICE uint32_t pack2(float a, float b);
template <> PK_DEVICE uint32_t pack2<f16>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <> PK_DEVICE uint32_t pack2<bf16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

PK_DEVICE unsigned thread_index() { return threadIdx.x; }
PK_DEVICE unsigned block_index() { return blockIdx.x; }
PK_DEVICE unsigned block_index_y() { return blockIdx.y; }
PK_DEVICE unsigned block_index_z() { return blockIdx.z; }
PK_DEVICE void block_sync() { __syncthreads(); }
// The sum over the warp's 32 lanes, in every lane (a butterfly: v + lane ^ 16's, then ^ 8, ...).
PK_DEVICE float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
PK_DEVICE void atomic_add(float* p, float v) { atomicAdd(p, v); }

// 16 bytes of a frozen operand read once: streamed past L1 (it would only evict what is reused).
PK_DEVICE u32x4 load_stream16(const void* p) {
  u32x4 v;
  asm volatile("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// 16 bytes that other warps of the block read too (x, lora_A): cached.
PK_DEVICE u32x4 load_cached16(const void* p) { return *static_cast<const u32x4*>(p); }
// Data written by other blocks of this launch: read at L2 (L1 is not coherent across SMs).
PK_DEVICE float load_l2(const float* p) { return __ldcg(p); }

// d = a [16 x 16] * b [16 x 8] + d, fp32 accumulators (PTX ISA, mma.m16n8k16 fragments).
PK_DEVICE void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], f16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
PK_DEVICE void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bf16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Arrival at a counter shared by the blocks of one launch: everything this block wrote before
// (every thread, after a block_sync) is visible to whoever sees the new count. Returns the old one.
PK_DEVICE int arrive(int* counter) {
  __threadfence();
  return atomicAdd(counter, 1);
}
PK_DEVICE void acquire_fence() { __threadfence(); }
PK_DEVICE int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
PK_DEVICE void store_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
PK_DEVICE void backoff() { __nanosleep(64); }
// A wait that cannot end is a bug: stop the kernel with an error rather than hang the process.
PK_DEVICE void fail() { __trap(); }
// One rounding each, never contracted into an FMA: the 4-bit decode must round as the reference.
PK_DEVICE float mul_rn(float a, float b) { return __fmul_rn(a, b); }
PK_DEVICE float add_rn(float a, float b) { return __fadd_rn(a, b); }
PK_DEVICE uint8_t load_u8(const uint8_t* p) { return __ldg(p); }
#else
using namespace ::peft_kernels_emu;  // f16, bf16, u32x4, to_f, from_f, ... (tests/cuda_emu/emu.h)
#endif

PK_DEVICE uint32_t word(const u32x4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

}  // namespace dev
}  // namespace peft_kernels
