// Launchers for the LoRA CUDA kernels (lora_kernels.cu). Plain C++ types only, so the kernel
// translation unit needs no torch headers (it compiles in seconds) and the registration unit
// (lora.cpp) needs no CUDA device code.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peft_kernels {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Multiprocessors of the current device (launch plans size their grids by it).
int sm_count();

// u [M, r] fp32 = dropout(x) [M, K] @ A^T, A [r, K]; seed: device int64 [1] or null (p = 0).
void launch_lora_down(const void* x, const void* A, const int64_t* seed, float* u, int64_t M, int64_t K,
                      int64_t r, double p, DType dt, cudaStream_t stream);
// C [M, N] (x's dtype) = bias + s * u @ B^T, B [N, r]; bias may be null.
void launch_lora_up(const float* u, const void* B, const void* bias, void* C, int64_t M, int64_t N, int64_t r,
                    float s, DType dt, cudaStream_t stream);
// v [M, r] fp32 = dY [M, N] @ B.
void launch_lora_dy(const void* dy, const void* B, float* v, int64_t M, int64_t N, int64_t r, DType dt,
                    cudaStream_t stream);
// acc [cols, r] fp32 += s * src^T @ w over rows, src [M, cols] (dropout applied when seed is
// given: the dA case, src = x), w [M, r] fp32. acc must be zeroed (the M range is split).
void launch_lora_weight_grad(const void* src, const float* w, const int64_t* seed, float* acc, int64_t M,
                             int64_t cols, int64_t r, float s, double p, DType dt, cudaStream_t stream);
// D [M, K] (x's dtype) = s * dropout'(v @ A): the LoRA part of dX, A [r, K].
void launch_lora_dx(const float* v, const void* A, const int64_t* seed, void* D, int64_t M, int64_t K,
                    int64_t r, float s, double p, DType dt, cudaStream_t stream);

// The single-kernel forward for M <= kSmallMMaxM tokens (lora_small_m.cuh): fp16 / bf16, r <=
// kSmallMMaxRank, K % 8 == 0, x / W / A 16-byte aligned. y [M, N] = x W^T + bias + s u B^T and
// u [M, r] fp32 = dropout(x) A^T, in one launch; part [splits * M * N] and upart [producers * M * r]
// fp32 are scratch, counters [groups + 2] int32 must be zero.
constexpr int64_t kSmallMMaxM = 64;
constexpr int64_t kSmallMMaxRank = 64;
struct SmallMPlan {
  int groups, splits, producers, tiles;
};
// With `packed` set, W is a bitsandbytes 4-bit weight instead of `w` (lora_small_m.cuh, Params):
// absmax fp32, or uint8 with absmax2 / code2 / offset; code [16]; blocksize >= 32, K % blocksize == 0.
// r = 0: no adapter (a, b unused), the frozen layer alone.
struct SmallMArgs {
  const void *x, *w, *a, *b, *bias;
  const int64_t* seed;
  void* y;
  float *u, *part, *upart;
  int* counters;
  int64_t M, K, N, r;
  float s;
  double dropout_p;
  const uint8_t* packed;
  const void* absmax;
  const float *absmax2, *code, *code2, *offset;
  int64_t blocksize;
};
SmallMPlan plan_lora_small_m(int64_t M, int64_t K, int64_t N, int64_t r, bool quant);
void launch_lora_small_m_fwd(const SmallMArgs& args, const SmallMPlan& plan, DType dt, cudaStream_t stream);

// The single-kernel backward for M <= kSmallMMaxM tokens (lora_small_m_bwd.cuh): fp16 / bf16,
// r <= kSmallMMaxRank, K % 8 == 0, N % 8 == 0, dY / W 16-byte aligned. dx [M, K] (null: not
// needed), da [r, K], db [N, r] in x's dtype; part [splits * M * K], vpart [producers * M * r],
// v [M * r] fp32 are scratch, counters [groups + 2] int32 must be zero.
struct SmallMBwdArgs {
  const void *dy, *x, *w, *a, *b;
  const float* u;
  const int64_t* seed;
  void *dx, *da, *db;
  float *part, *vpart, *v;
  int* counters;
  int64_t M, K, N, r;
  float s;
  double dropout_p;
};
SmallMPlan plan_lora_small_m_bwd(int64_t M, int64_t K, int64_t N, bool need_dx);
void launch_lora_small_m_bwd(const SmallMBwdArgs& args, const SmallMPlan& plan, DType dt, cudaStream_t stream);

}  // namespace peft_kernels
