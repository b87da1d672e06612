// csrc/lora_kernels.cuh (the CUDA backend's LoRA pieces around cuBLAS) built for the CPU emulator
// (emu.h): the C entry points of lora_kernels_emu.h.
#include "lora_kernels_emu.h"

#include "emu.h"

#include "../../csrc/lora_kernels.cuh"

namespace lp = peft_kernels::lora_pieces;
using peft_kernels::mask::keep_threshold;

template <typename F>
static void by_dtype(int dtype, F&& f) {
  if (dtype == 0) f(float{});
  else if (dtype == 1) f(peft_kernels_emu::f16{});
  else f(peft_kernels_emu::bf16{});
}

// body(dynamic shared memory) for every thread of the plan's grid. The shared memory is exactly the
// plan's (its own allocation: the memcheck driver runs these entries under AddressSanitizer).
template <typename F>
static void run(const lp::Plan& plan, F&& body) {
  std::vector<float> smem(static_cast<size_t>(plan.smem_floats));
  peft_kernels_emu::launch(plan.gx, plan.gy, plan.gz, lp::kThreads, [&] { body(smem.data()); });
}

extern "C" void emu_lora_down(int dtype, const void* x, const void* A, const int64_t* seed, float* u, int64_t M,
                              int64_t K, int64_t r, double p) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run(lp::row_reduce_plan(M, r), [&](float*) {
      lp::row_reduce_body<T>(static_cast<const T*>(x), static_cast<const T*>(A), seed, u, K, r, K, 1, lp::inv_keep(p),
                             keep_threshold(p));
    });
  });
}

extern "C" void emu_lora_up(int dtype, const float* u, const void* B, const void* bias, void* C, int64_t M, int64_t N,
                            int64_t r, float s) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run(lp::row_map_plan(M, N, r), [&](float* urow) {
      lp::up_body<T>(u, static_cast<const T*>(B), static_cast<const T*>(bias), static_cast<T*>(C), N, r, s, urow);
    });
  });
}

extern "C" void emu_lora_dy(int dtype, const void* dy, const void* B, float* v, int64_t M, int64_t N, int64_t r) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run(lp::row_reduce_plan(M, r), [&](float*) {
      lp::row_reduce_body<T>(static_cast<const T*>(dy), static_cast<const T*>(B), nullptr, v, N, r, 1, r, 1.f, 0u);
    });
  });
}

extern "C" int emu_lora_weight_grad(int dtype, const void* src, const float* w, const int64_t* seed, float* acc,
                                    int64_t M, int64_t cols, int64_t r, float s, double p, int sms) {
  int64_t rows_per_slice = 0;
  const lp::Plan plan = lp::weight_grad_plan(M, cols, r, sms, rows_per_slice);
  if (plan.gz == 0) return 0;
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run(plan, [&](float*) {
      lp::weight_grad_body<T>(static_cast<const T*>(src), w, seed, acc, M, cols, r, rows_per_slice, s,
                              lp::inv_keep(p), keep_threshold(p));
    });
  });
  return static_cast<int>(plan.gz);
}

extern "C" void emu_lora_dx(int dtype, const float* v, const void* A, const int64_t* seed, void* D, int64_t M,
                            int64_t K, int64_t r, float s, double p) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    run(lp::row_map_plan(M, K, r), [&](float* vrow) {
      lp::dx_body<T>(v, static_cast<const T*>(A), seed, static_cast<T*>(D), K, r, s, lp::inv_keep(p),
                     keep_threshold(p), vrow);
    });
  });
}
