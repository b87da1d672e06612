// csrc/lora_small_m.cuh built for the CPU emulator (emu.h): a C entry point over host pointers,
// called with ctypes by tests/test_cuda_small_m_emulated.py.
#include "emu.h"

#include "../../csrc/lora_small_m.cuh"

namespace sm = peft_kernels::small_m;

template <typename T>
static void run(sm::Params p, int tiles) {
  auto body = [&] {
    switch (tiles) {
      case 1: sm::lora_small_m_fwd_kernel<T, 1>(p); break;
      case 2: sm::lora_small_m_fwd_kernel<T, 2>(p); break;
      default: sm::lora_small_m_fwd_kernel<T, 4>(p); break;
    }
  };
  peft_kernels_emu::launch(p.producers + p.groups * p.splits, sm::kThreads, body);
}

// dtype: 0 fp16, 1 bf16. seed: null without dropout. splits / producers > 0 override the plan
// (made for `sms` multiprocessors). counters_out [groups + 2]: the counters after the launch.
// Returns the number of blocks launched, or -1 on an unsupported input.
extern "C" int emu_lora_small_m_fwd(int dtype, const void* x, const void* w, const void* a, const void* b,
                                    const void* bias, const int64_t* seed, void* y, float* u, int64_t M, int64_t K,
                                    int64_t N, int64_t r, float s, double dropout_p, int sms, int splits,
                                    int producers, int* counters_out) {
  if (M < 1 || M > 64 || K < 1 || K % 8 != 0 || N < 1 || r < 1 || r > sm::kMaxRank) return -1;
  sm::Plan plan = sm::plan(M, K, N, sms);
  if (splits > 0) plan.splits = splits;
  if (producers > 0) plan.producers = producers;
  std::vector<float> part(static_cast<size_t>(plan.splits * M * N), -1.f);  // garbage-filled workspace
  std::vector<float> upart(static_cast<size_t>(plan.producers * M * r), -1.f);
  std::vector<int> counters(static_cast<size_t>(plan.groups + 2), 0);
  sm::Params p{x, w, a, b, bias, seed, y, u, part.data(), upart.data(), counters.data(), M, K, N, r,
               plan.groups, plan.splits, plan.producers, s,
               static_cast<float>(dropout_p > 0 ? 1.0 / (1.0 - dropout_p) : 1.0),
               peft_kernels::mask::keep_threshold(dropout_p)};
  if (dtype == 0) run<peft_kernels_emu::f16>(p, plan.tiles);
  else run<peft_kernels_emu::bf16>(p, plan.tiles);
  if (counters_out) std::memcpy(counters_out, counters.data(), counters.size() * sizeof(int));
  return plan.blocks();
}

extern "C" void emu_lora_small_m_plan(int64_t M, int64_t K, int64_t N, int sms, int* out /* groups, splits, producers, tiles */) {
  const sm::Plan plan = sm::plan(M, K, N, sms);
  out[0] = plan.groups;
  out[1] = plan.splits;
  out[2] = plan.producers;
  out[3] = plan.tiles;
}
