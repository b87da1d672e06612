// csrc/lora_small_m.cuh built for the CPU emulator (emu.h): C entry points over host pointers,
// called with ctypes by tests/test_cuda_small_m_emulated.py.
#include "emu.h"

#include "../../csrc/lora_small_m.cuh"

namespace sm = peft_kernels::small_m;

template <typename T, bool Q>
static void run(const sm::Params& p, int tiles) {
  auto body = [&] {
    switch (tiles) {
      case 1: sm::lora_small_m_fwd_kernel<T, 1, Q>(p); break;
      case 2: sm::lora_small_m_fwd_kernel<T, 2, Q>(p); break;
      default: sm::lora_small_m_fwd_kernel<T, 4, Q>(p); break;
    }
  };
  peft_kernels_emu::launch(p.producers + p.groups * p.splits, sm::kThreads, body);
}

// dtype: 0 fp16, 1 bf16. seed: null without dropout. r = 0: no adapter. packed != null: W is the
// 4-bit weight (absmax, absmax2, code, code2, offset, blocksize as in Params), w unused.
// splits / producers > 0 override the plan (made for `sms` multiprocessors). counters_out
// [groups + 2]: the counters after the launch. Returns the number of blocks, or -1 on bad input.
extern "C" int emu_lora_small_m_fwd(int dtype, const void* x, const void* w, const void* a, const void* b,
                                    const void* bias, const int64_t* seed, void* y, float* u, int64_t M, int64_t K,
                                    int64_t N, int64_t r, float s, double dropout_p, const uint8_t* packed,
                                    const void* absmax, const float* absmax2, const float* code, const float* code2,
                                    const float* offset, int64_t blocksize, int sms, int splits, int producers,
                                    int* counters_out) {
  if (M < 1 || M > 64 || K < 1 || K % 8 != 0 || N < 1 || r < 0 || r > sm::kMaxRank) return -1;
  if (packed && (blocksize < 32 || K % blocksize != 0)) return -1;
  sm::Plan plan = sm::plan(M, K, N, r, sms, packed != nullptr);
  if (splits > 0) plan.splits = splits;
  if (producers > 0 && r > 0) plan.producers = producers;
  std::vector<float> part(static_cast<size_t>(plan.splits * M * N), -1.f);  // garbage-filled workspace
  std::vector<float> upart(static_cast<size_t>(plan.producers * M * (r > 0 ? r : 1)), -1.f);
  std::vector<int> counters(static_cast<size_t>(plan.groups + 2), 0);
  const sm::Params p = sm::make_params(x, w, a, b, bias, seed, y, u, part.data(), upart.data(), counters.data(), M,
                                       K, N, r, s, dropout_p, packed, absmax, absmax2, code, code2, offset, blocksize,
                                       plan);
  const bool q = packed != nullptr;
  if (dtype == 0) q ? run<peft_kernels_emu::f16, true>(p, plan.tiles) : run<peft_kernels_emu::f16, false>(p, plan.tiles);
  else q ? run<peft_kernels_emu::bf16, true>(p, plan.tiles) : run<peft_kernels_emu::bf16, false>(p, plan.tiles);
  if (counters_out) std::memcpy(counters_out, counters.data(), counters.size() * sizeof(int));
  return plan.blocks();
}

// out: groups, splits, producers, tiles
extern "C" void emu_lora_small_m_plan(int64_t M, int64_t K, int64_t N, int64_t r, int sms, int quant, int* out) {
  const sm::Plan plan = sm::plan(M, K, N, r, sms, quant != 0);
  out[0] = plan.groups;
  out[1] = plan.splits;
  out[2] = plan.producers;
  out[3] = plan.tiles;
}
