// Instantiations and the launcher of the single-kernel LoRA forward for few tokens
// (lora_small_m.cuh: the kernel and its plan, shared with the CPU emulator of tests/cuda_emu).
#include "lora_kernels.h"
#include "lora_small_m.cuh"

namespace peft_kernels {

namespace {
int multiprocessors() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 1;
}
}  // namespace

SmallMPlan plan_lora_small_m(int64_t M, int64_t K, int64_t N) {
  const small_m::Plan p = small_m::plan(M, K, N, multiprocessors());
  return {p.groups, p.splits, p.producers, p.tiles};
}

void launch_lora_small_m_fwd(const SmallMArgs& args, const SmallMPlan& plan, DType dt, cudaStream_t stream) {
  const small_m::Params p{args.x, args.w, args.a, args.b, args.bias, args.seed, args.y, args.u, args.part,
                          args.upart, args.counters, args.M, args.K, args.N, args.r, plan.groups, plan.splits,
                          plan.producers, args.s,
                          static_cast<float>(args.dropout_p > 0 ? 1.0 / (1.0 - args.dropout_p) : 1.0),
                          mask::keep_threshold(args.dropout_p)};
  const dim3 grid(static_cast<unsigned>(plan.producers + plan.groups * plan.splits));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    switch (plan.tiles) {
      case 1: small_m::lora_small_m_fwd_kernel<T, 1><<<grid, small_m::kThreads, 0, stream>>>(p); break;
      case 2: small_m::lora_small_m_fwd_kernel<T, 2><<<grid, small_m::kThreads, 0, stream>>>(p); break;
      default: small_m::lora_small_m_fwd_kernel<T, 4><<<grid, small_m::kThreads, 0, stream>>>(p); break;
    }
  };
  if (dt == DType::BF16) go(dev::bf16{});
  else go(dev::f16{});
}

}  // namespace peft_kernels
