// LoRA's memory-bound pieces in CUDA C++ (the big products stay on cuBLAS, see lora.cpp): the
// kernel bodies and their launch plans. lora_kernels.cu wraps them in __global__ kernels; the CPU
// emulator (tests/cuda_emu/lora_kernels_emu.cpp) runs the same bodies with the same plans, which is
// how CI tests them. Dropout: the counter-based mask of peft_kernels/reference/rng.py, bit for bit,
// regenerated wherever it is needed and never stored. All accumulation in fp32. Every launch has
// kThreads threads a block in x; the grid is 2-D or 3-D (blockIdx.y / .z: dev::block_index_y / _z).
#pragma once
#include <cstdint>

#include "device_compat.cuh"
#include "dropout_mask.cuh"

namespace peft_kernels {
namespace lora_pieces {

constexpr int kThreads = 256;
constexpr int kJ = 8;  // rank columns per block in the reductions

inline unsigned blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }
// Kept elements are scaled by 1 / (1 - p), in fp32 (the reference's keep scale).
inline float inv_keep(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

// A launch: grid (x, y, z), dynamic shared memory in floats.
struct Plan {
  unsigned gx, gy, gz;
  int64_t smem_floats;
};
// row_reduce_body (down: rows = M, reduced over K; dY pass: over N): one block per row and kJ ranks.
inline Plan row_reduce_plan(int64_t M, int64_t r) { return {static_cast<unsigned>(M), blocks(r, kJ), 1, 0}; }
// up_body / dx_body: kThreads columns a block, one row of tokens in y; the row of u / v in shared memory.
inline Plan row_map_plan(int64_t M, int64_t cols, int64_t r) {
  return {blocks(cols, kThreads), static_cast<unsigned>(M), 1, r};
}
// weight_grad_body: kThreads columns x kJ ranks a block, the token range split into z slices so
// the grid has work for about 4 blocks per SM even when cols * r is small. rows_per_slice out.
inline Plan weight_grad_plan(int64_t M, int64_t cols, int64_t r, int sms, int64_t& rows_per_slice) {
  const int64_t col_blocks = blocks(cols, kThreads) * static_cast<int64_t>(blocks(r, kJ));
  if (M <= 0 || col_blocks == 0) {  // nothing to launch
    rows_per_slice = 0;
    return {0, 0, 0, 0};
  }
  int64_t slices = (4 * static_cast<int64_t>(sms) + col_blocks - 1) / col_blocks;
  slices = slices < 1 ? 1 : (slices > M ? M : slices);
  rows_per_slice = (M + slices - 1) / slices;
  slices = (M + rows_per_slice - 1) / rows_per_slice;
  return {blocks(cols, kThreads), blocks(r, kJ), static_cast<unsigned>(slices), 0};
}

// The sum of v over the block, valid in thread 0 (a butterfly in each warp, then warp 0 over the
// warps' sums); smem: kThreads / 32 floats.
PK_DEVICE float block_sum(float v, float* smem) {
  v = dev::warp_sum(v);
  const unsigned tid = dev::thread_index(), warp = tid >> 5, lane = tid & 31;
  dev::block_sync();
  if (lane == 0) smem[warp] = v;
  dev::block_sync();
  float total = 0.f;
  if (tid < 32) total = dev::warp_sum(tid < kThreads / 32 ? smem[tid] : 0.f);
  return total;
}

// This thread's column in a row_map_plan / weight_grad_plan grid (threads run along the columns).
PK_DEVICE int64_t column() { return static_cast<int64_t>(dev::block_index()) * kThreads + dev::thread_index(); }

// Row m of an [M, r] fp32 matrix (u or v) into shared memory, every thread helping, then a barrier.
PK_DEVICE void stage_row(const float* __restrict__ src, int64_t m, int64_t r, float* row) {
  for (int64_t j = dev::thread_index(); j < r; j += kThreads) row[j] = src[m * r + j];
  dev::block_sync();
}

// out[m, j0..j0+kJ) = sum_k drop(src[m, k]) * w[j * stride_j + k * stride_k]   (row_reduce_plan)
// down: src = x, w = A [r, K] (stride_j = K, stride_k = 1), dropout on;
// dY pass: src = dY, w = B [N, r] read as B^T (stride_j = 1, stride_k = r), no dropout.
template <typename T>
PK_DEVICE void row_reduce_body(const T* __restrict__ src, const T* __restrict__ w, const int64_t* __restrict__ seed,
                               float* __restrict__ out, int64_t K, int64_t r, int64_t stride_j, int64_t stride_k,
                               float inv_keep, uint32_t threshold) {
  __shared__ float smem[kThreads / 32];
  const int64_t m = dev::block_index();
  const int64_t j0 = static_cast<int64_t>(dev::block_index_y()) * kJ;
  const uint32_t key = seed ? mask::row_key(*seed, static_cast<uint32_t>(m)) : 0u;
  float acc[kJ] = {0.f};
  for (int64_t k = dev::thread_index(); k < K; k += kThreads) {
    float xv = dev::to_f(src[m * K + k]);
    if (seed) xv = mask::keep(key, static_cast<uint32_t>(k), threshold) ? xv * inv_keep : 0.f;
#pragma unroll
    for (int j = 0; j < kJ; ++j)
      if (j0 + j < r) acc[j] += xv * dev::to_f(w[(j0 + j) * stride_j + k * stride_k]);
  }
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    const float t = block_sum(acc[j], smem);
    if (dev::thread_index() == 0 && j0 + j < r) out[m * r + j0 + j] = t;
  }
}

// C[m, n] = bias[n] + s * sum_j u[m, j] * B[n, j]   (row_map_plan over N; urow: r floats of shared memory)
template <typename T>
PK_DEVICE void up_body(const float* __restrict__ u, const T* __restrict__ B, const T* __restrict__ bias,
                       T* __restrict__ C, int64_t N, int64_t r, float s, float* urow) {
  const int64_t m = dev::block_index_y();
  stage_row(u, m, r, urow);
  const int64_t n = column();
  if (n >= N) return;
  float acc = 0.f;
  for (int64_t j = 0; j < r; ++j) acc += urow[j] * dev::to_f(B[n * r + j]);
  const float b = bias ? dev::to_f(bias[n]) : 0.f;
  C[m * N + n] = dev::from_f<T>(b + s * acc);
}

// acc[c, j] += s * sum_{m in this block's slice} drop(src[m, c]) * w[m, j]   (weight_grad_plan).
// Threads run along c: coalesced.
template <typename T>
PK_DEVICE void weight_grad_body(const T* __restrict__ src, const float* __restrict__ w,
                                const int64_t* __restrict__ seed, float* __restrict__ acc_out, int64_t M, int64_t cols,
                                int64_t r, int64_t rows_per_slice, float s, float inv_keep, uint32_t threshold) {
  const int64_t c = column();
  const int64_t j0 = static_cast<int64_t>(dev::block_index_y()) * kJ;
  const int64_t m_lo = static_cast<int64_t>(dev::block_index_z()) * rows_per_slice;
  const int64_t m_hi = m_lo + rows_per_slice < M ? m_lo + rows_per_slice : M;
  if (c >= cols) return;
  float acc[kJ] = {0.f};
  for (int64_t m = m_lo; m < m_hi; ++m) {
    float xv = dev::to_f(src[m * cols + c]);
    if (seed)
      xv = mask::keep(mask::row_key(*seed, static_cast<uint32_t>(m)), static_cast<uint32_t>(c), threshold) ? xv * inv_keep
                                                                                                           : 0.f;
#pragma unroll
    for (int j = 0; j < kJ; ++j)
      if (j0 + j < r) acc[j] += xv * w[m * r + j0 + j];
  }
#pragma unroll
  for (int j = 0; j < kJ; ++j)
    if (j0 + j < r) dev::atomic_add(&acc_out[c * r + j0 + j], s * acc[j]);
}

// D[m, k] = s * drop'(sum_j v[m, j] * A[j, k])   (row_map_plan over K; vrow: r floats of shared memory)
template <typename T>
PK_DEVICE void dx_body(const float* __restrict__ v, const T* __restrict__ A, const int64_t* __restrict__ seed,
                       T* __restrict__ D, int64_t K, int64_t r, float s, float inv_keep, uint32_t threshold, float* vrow) {
  const int64_t m = dev::block_index_y();
  stage_row(v, m, r, vrow);
  const int64_t k = column();
  if (k >= K) return;
  float acc = 0.f;
  for (int64_t j = 0; j < r; ++j) acc += vrow[j] * dev::to_f(A[j * K + k]);
  acc *= s;
  if (seed)
    acc = mask::keep(mask::row_key(*seed, static_cast<uint32_t>(m)), static_cast<uint32_t>(k), threshold) ? acc * inv_keep
                                                                                                         : 0.f;
  D[m * K + k] = dev::from_f<T>(acc);
}

}  // namespace lora_pieces
}  // namespace peft_kernels
