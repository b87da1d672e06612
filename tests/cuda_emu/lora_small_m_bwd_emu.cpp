// csrc/lora_small_m_bwd.cuh built for the CPU emulator (emu.h): a C entry point over host
// pointers, called with ctypes by tests/test_cuda_small_m_emulated.py.
#include "emu.h"

#include "../../csrc/lora_small_m_bwd.cuh"

namespace smb = peft_kernels::small_m_bwd;

template <typename T>
static void run(const smb::Params& p, int tiles) {
  auto body = [&] {
    switch (tiles) {
      case 1: smb::lora_small_m_bwd_kernel<T, 1>(p); break;
      case 2: smb::lora_small_m_bwd_kernel<T, 2>(p); break;
      default: smb::lora_small_m_bwd_kernel<T, 4>(p); break;
    }
  };
  peft_kernels_emu::launch(p.producers + p.groups * p.splits, smb::kThreads, body);
}

// dtype: 0 fp16, 1 bf16. seed: null without dropout. dx may be null (need_dx = 0). splits /
// producers > 0 override the plan (made for `sms` multiprocessors). Returns the number of blocks,
// or -1 on bad input.
extern "C" int emu_lora_small_m_bwd(int dtype, const void* dy, const void* x, const void* w, const void* a,
                                    const void* b, const float* u, const int64_t* seed, void* dx, void* da, void* db,
                                    int64_t M, int64_t K, int64_t N, int64_t r, float s, double dropout_p, int sms,
                                    int splits, int producers, int* counters_out) {
  if (M < 1 || M > 64 || K < 8 || K % 8 != 0 || N < 8 || N % 8 != 0 || r < 1 || r > smb::kMaxRank) return -1;
  const bool need_dx = dx != nullptr;
  smb::Plan plan = smb::plan(M, K, N, sms, need_dx);
  if (splits > 0 && need_dx) plan.splits = splits;
  if (producers > 0) plan.producers = producers;
  std::vector<float> part(static_cast<size_t>(plan.splits * M * K), -1.f);  // garbage-filled workspaces
  std::vector<float> vpart(static_cast<size_t>(plan.producers * M * r), -1.f), v(static_cast<size_t>(M * r), -1.f);
  std::vector<int> counters(static_cast<size_t>(plan.groups + 2), 0);
  const smb::Params p = smb::make_params(dy, x, w, a, b, u, seed, dx, da, db, part.data(), vpart.data(), v.data(),
                                         counters.data(), M, K, N, r, need_dx, s, dropout_p, plan);
  if (dtype == 0) run<peft_kernels_emu::f16>(p, plan.tiles);
  else run<peft_kernels_emu::bf16>(p, plan.tiles);
  if (counters_out) std::memcpy(counters_out, counters.data(), counters.size() * sizeof(int));
  return plan.blocks();
}
