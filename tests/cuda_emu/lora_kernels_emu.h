// The emulated LoRA pieces' C entry points (lora_kernels_emu.cpp): each launches one body of
// csrc/lora_kernels.cuh with its plan, as csrc/lora_kernels.cu's launchers do. Over host pointers;
// dtype: 0 fp32, 1 fp16, 2 bf16 (lora_kernels.h's DType); seed null without dropout. Called with
// ctypes by tests/test_cuda_lora_kernels_emulated.py and directly by memcheck_driver.cpp.
#pragma once
#include <cstdint>

extern "C" {
// u [M, r] = dropout(x) [M, K] @ A^T (kept elements times 1 / (1 - p)).
void emu_lora_down(int dtype, const void* x, const void* A, const int64_t* seed, float* u, int64_t M, int64_t K,
                   int64_t r, double p);
// C [M, N] = bias + s * u @ B^T; bias may be null.
void emu_lora_up(int dtype, const float* u, const void* B, const void* bias, void* C, int64_t M, int64_t N, int64_t r,
                 float s);
// v [M, r] = dY [M, N] @ B.
void emu_lora_dy(int dtype, const void* dy, const void* B, float* v, int64_t M, int64_t N, int64_t r);
// acc [cols, r] += s * dropout(src)^T @ w over M tokens in slices planned for `sms` multiprocessors;
// returns the number of slices launched (0: nothing to do).
int emu_lora_weight_grad(int dtype, const void* src, const float* w, const int64_t* seed, float* acc, int64_t M,
                         int64_t cols, int64_t r, float s, double p, int sms);
// D [M, K] = s * dropout'(v @ A).
void emu_lora_dx(int dtype, const float* v, const void* A, const int64_t* seed, void* D, int64_t M, int64_t K,
                 int64_t r, float s, double p);
}
