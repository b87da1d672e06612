// The launchers of LoRA's memory-bound pieces around cuBLAS (lora.cpp calls them): __global__
// wrappers of the kernel bodies in lora_kernels.cuh, launched with its plans (the CPU emulator
// runs the same bodies and plans: tests/cuda_emu/lora_kernels_emu.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_kernels.cuh"
#include "lora_kernels.h"

namespace peft_kernels {
namespace {

using namespace lora_pieces;  // kThreads, the bodies and their plans
using mask::keep_threshold;

template <typename T>
__global__ void row_reduce_kernel(const T* __restrict__ src, const T* __restrict__ w, const int64_t* __restrict__ seed,
                                  float* __restrict__ out, int64_t K, int64_t r, int64_t stride_j, int64_t stride_k,
                                  float inv_keep, uint32_t threshold) {
  row_reduce_body<T>(src, w, seed, out, K, r, stride_j, stride_k, inv_keep, threshold);
}

template <typename T>
__global__ void up_kernel(const float* __restrict__ u, const T* __restrict__ B, const T* __restrict__ bias,
                          T* __restrict__ C, int64_t N, int64_t r, float s) {
  extern __shared__ float urow[];
  up_body<T>(u, B, bias, C, N, r, s, urow);
}

template <typename T>
__global__ void weight_grad_kernel(const T* __restrict__ src, const float* __restrict__ w,
                                   const int64_t* __restrict__ seed, float* __restrict__ acc_out, int64_t M,
                                   int64_t cols, int64_t r, int64_t rows_per_slice, float s, float inv_keep,
                                   uint32_t threshold) {
  weight_grad_body<T>(src, w, seed, acc_out, M, cols, r, rows_per_slice, s, inv_keep, threshold);
}

template <typename T>
__global__ void dx_kernel(const float* __restrict__ v, const T* __restrict__ A, const int64_t* __restrict__ seed,
                          T* __restrict__ D, int64_t K, int64_t r, float s, float inv_keep, uint32_t threshold) {
  extern __shared__ float vrow[];
  dx_body<T>(v, A, seed, D, K, r, s, inv_keep, threshold, vrow);
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
  }
}

dim3 grid_of(const Plan& p) { return dim3(p.gx, p.gy, p.gz); }
size_t smem_of(const Plan& p) { return static_cast<size_t>(p.smem_floats) * sizeof(float); }

}  // namespace

int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 1;
}

void launch_lora_down(const void* x, const void* A, const int64_t* seed, float* u, int64_t M, int64_t K,
                      int64_t r, double p, DType dt, cudaStream_t stream) {
  const Plan plan = row_reduce_plan(M, r);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    row_reduce_kernel<T><<<grid_of(plan), kThreads, smem_of(plan), stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(A), seed, u, K, r, K, 1, inv_keep(p), keep_threshold(p));
  });
}

void launch_lora_up(const float* u, const void* B, const void* bias, void* C, int64_t M, int64_t N, int64_t r,
                    float s, DType dt, cudaStream_t stream) {
  const Plan plan = row_map_plan(M, N, r);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    up_kernel<T><<<grid_of(plan), kThreads, smem_of(plan), stream>>>(
        u, static_cast<const T*>(B), static_cast<const T*>(bias), static_cast<T*>(C), N, r, s);
  });
}

void launch_lora_dy(const void* dy, const void* B, float* v, int64_t M, int64_t N, int64_t r, DType dt,
                    cudaStream_t stream) {
  const Plan plan = row_reduce_plan(M, r);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    row_reduce_kernel<T><<<grid_of(plan), kThreads, smem_of(plan), stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(B), nullptr, v, N, r, 1, r, 1.f, 0u);
  });
}

void launch_lora_weight_grad(const void* src, const float* w, const int64_t* seed, float* acc, int64_t M,
                             int64_t cols, int64_t r, float s, double p, DType dt, cudaStream_t stream) {
  int64_t rows_per_slice = 0;
  const Plan plan = weight_grad_plan(M, cols, r, sm_count(), rows_per_slice);
  if (plan.gz == 0) return;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    weight_grad_kernel<T><<<grid_of(plan), kThreads, smem_of(plan), stream>>>(
        static_cast<const T*>(src), w, seed, acc, M, cols, r, rows_per_slice, s, inv_keep(p), keep_threshold(p));
  });
}

void launch_lora_dx(const float* v, const void* A, const int64_t* seed, void* D, int64_t M, int64_t K,
                    int64_t r, float s, double p, DType dt, cudaStream_t stream) {
  const Plan plan = row_map_plan(M, K, r);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    dx_kernel<T><<<grid_of(plan), kThreads, smem_of(plan), stream>>>(
        v, static_cast<const T*>(A), seed, static_cast<T*>(D), K, r, s, inv_keep(p), keep_threshold(p));
  });
}

}  // namespace peft_kernels
