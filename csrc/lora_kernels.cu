// LoRA's memory-bound pieces in CUDA C++ (the big products stay on cuBLAS, see lora.cpp).
// Dropout: the counter-based mask of peft_kernels/reference/rng.py, bit for bit, regenerated
// wherever it is needed and never stored. All accumulation in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "dropout_mask.cuh"
#include "lora_kernels.h"

namespace peft_kernels {
namespace {

using mask::keep;
using mask::keep_threshold;
using mask::row_key;

constexpr int kThreads = 256;
constexpr int kJ = 8;  // rank columns per block in the reductions

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x < 32) {
    total = threadIdx.x < (blockDim.x >> 5) ? smem[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  }
  return total;  // valid in thread 0
}

// out[m, j0..j0+kJ) = sum_k drop(src[m, k]) * w[j * stride_j + k * stride_k]   (grid: M x ceil(r / kJ))
// down: src = x, w = A [r, K] (stride_j = K, stride_k = 1), dropout on;
// dY pass: src = dY, w = B [N, r] read as B^T (stride_j = 1, stride_k = r), no dropout.
template <typename T>
__global__ void row_reduce_kernel(const T* __restrict__ src, const T* __restrict__ w, const int64_t* __restrict__ seed,
                                  float* __restrict__ out, int64_t K, int64_t r, int64_t stride_j, int64_t stride_k,
                                  float inv_keep, uint32_t threshold) {
  __shared__ float smem[32];
  const int64_t m = blockIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kJ;
  const uint32_t key = seed ? row_key(*seed, static_cast<uint32_t>(m)) : 0u;
  float acc[kJ] = {0.f};
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    float xv = to_f(src[m * K + k]);
    if (seed) xv = keep(key, static_cast<uint32_t>(k), threshold) ? xv * inv_keep : 0.f;
#pragma unroll
    for (int j = 0; j < kJ; ++j)
      if (j0 + j < r) acc[j] += xv * to_f(w[(j0 + j) * stride_j + k * stride_k]);
  }
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    const float t = block_sum(acc[j], smem);
    if (threadIdx.x == 0 && j0 + j < r) out[m * r + j0 + j] = t;
  }
}

// C[m, n] = bias[n] + s * sum_j u[m, j] * B[n, j]   (grid: ceil(N / kThreads) x M)
template <typename T>
__global__ void up_kernel(const float* __restrict__ u, const T* __restrict__ B, const T* __restrict__ bias,
                          T* __restrict__ C, int64_t N, int64_t r, float s) {
  extern __shared__ float urow[];
  const int64_t m = blockIdx.y;
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) urow[j] = u[m * r + j];
  __syncthreads();
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float acc = 0.f;
  for (int64_t j = 0; j < r; ++j) acc += urow[j] * to_f(B[n * r + j]);
  const float b = bias ? to_f(bias[n]) : 0.f;
  C[m * N + n] = from_f<T>(b + s * acc);
}

// acc[c, j] += s * sum_{m in this block's slice} drop(src[m, c]) * w[m, j]
// (grid: ceil(cols / kThreads) x ceil(r / kJ) x slices). Threads run along c: coalesced.
template <typename T>
__global__ void weight_grad_kernel(const T* __restrict__ src, const float* __restrict__ w,
                                   const int64_t* __restrict__ seed, float* __restrict__ acc_out, int64_t M,
                                   int64_t cols, int64_t r, int64_t rows_per_slice, float s, float inv_keep,
                                   uint32_t threshold) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kJ;
  const int64_t m_lo = static_cast<int64_t>(blockIdx.z) * rows_per_slice;
  const int64_t m_hi = m_lo + rows_per_slice < M ? m_lo + rows_per_slice : M;
  if (c >= cols) return;
  float acc[kJ] = {0.f};
  for (int64_t m = m_lo; m < m_hi; ++m) {
    float xv = to_f(src[m * cols + c]);
    if (seed) xv = keep(row_key(*seed, static_cast<uint32_t>(m)), static_cast<uint32_t>(c), threshold) ? xv * inv_keep : 0.f;
#pragma unroll
    for (int j = 0; j < kJ; ++j)
      if (j0 + j < r) acc[j] += xv * w[m * r + j0 + j];
  }
#pragma unroll
  for (int j = 0; j < kJ; ++j)
    if (j0 + j < r) atomicAdd(&acc_out[c * r + j0 + j], s * acc[j]);
}

// D[m, k] = s * drop'(sum_j v[m, j] * A[j, k])   (grid: ceil(K / kThreads) x M)
template <typename T>
__global__ void dx_kernel(const float* __restrict__ v, const T* __restrict__ A, const int64_t* __restrict__ seed,
                          T* __restrict__ D, int64_t K, int64_t r, float s, float inv_keep, uint32_t threshold) {
  extern __shared__ float vrow[];
  const int64_t m = blockIdx.y;
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) vrow[j] = v[m * r + j];
  __syncthreads();
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  float acc = 0.f;
  for (int64_t j = 0; j < r; ++j) acc += vrow[j] * to_f(A[j * K + k]);
  acc *= s;
  if (seed) acc = keep(row_key(*seed, static_cast<uint32_t>(m)), static_cast<uint32_t>(k), threshold) ? acc * inv_keep : 0.f;
  D[m * K + k] = from_f<T>(acc);
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
  }
}

unsigned blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace

int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 1;
}

void launch_lora_down(const void* x, const void* A, const int64_t* seed, float* u, int64_t M, int64_t K,
                      int64_t r, double p, DType dt, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    row_reduce_kernel<T><<<dim3(static_cast<unsigned>(M), blocks(r, kJ)), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(A), seed, u, K, r, K, 1, static_cast<float>(1.0 / (1.0 - p)),
        keep_threshold(p));
  });
}

void launch_lora_up(const float* u, const void* B, const void* bias, void* C, int64_t M, int64_t N, int64_t r,
                    float s, DType dt, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    up_kernel<T><<<dim3(blocks(N, kThreads), static_cast<unsigned>(M)), kThreads, r * sizeof(float), stream>>>(
        u, static_cast<const T*>(B), static_cast<const T*>(bias), static_cast<T*>(C), N, r, s);
  });
}

void launch_lora_dy(const void* dy, const void* B, float* v, int64_t M, int64_t N, int64_t r, DType dt,
                    cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    row_reduce_kernel<T><<<dim3(static_cast<unsigned>(M), blocks(r, kJ)), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(B), nullptr, v, N, r, 1, r, 1.f, 0u);
  });
}

void launch_lora_weight_grad(const void* src, const float* w, const int64_t* seed, float* acc, int64_t M,
                             int64_t cols, int64_t r, float s, double p, DType dt, cudaStream_t stream) {
  // Split the token range so the grid has work for every SM even when cols * r is small.
  const int64_t col_blocks = blocks(cols, kThreads) * static_cast<int64_t>(blocks(r, kJ));
  int64_t slices = (4 * sm_count() + col_blocks - 1) / col_blocks;
  slices = slices < 1 ? 1 : (slices > M ? (M > 0 ? M : 1) : slices);
  const int64_t rows_per_slice = (M + slices - 1) / slices;
  slices = (M + rows_per_slice - 1) / rows_per_slice;
  if (slices == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    weight_grad_kernel<T><<<dim3(blocks(cols, kThreads), blocks(r, kJ), static_cast<unsigned>(slices)), kThreads, 0,
                            stream>>>(static_cast<const T*>(src), w, seed, acc, M, cols, r, rows_per_slice, s,
                                      static_cast<float>(1.0 / (1.0 - p)), keep_threshold(p));
  });
}

void launch_lora_dx(const float* v, const void* A, const int64_t* seed, void* D, int64_t M, int64_t K,
                    int64_t r, float s, double p, DType dt, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    dx_kernel<T><<<dim3(blocks(K, kThreads), static_cast<unsigned>(M)), kThreads, r * sizeof(float), stream>>>(
        v, static_cast<const T*>(A), seed, static_cast<T*>(D), K, r, s, static_cast<float>(1.0 / (1.0 - p)), keep_threshold(p));
  });
}

}  // namespace peft_kernels
