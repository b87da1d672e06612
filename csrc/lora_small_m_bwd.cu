// Instantiations and the launcher of the single-kernel LoRA backward for few tokens
// (lora_small_m_bwd.cuh: the kernel and its plan, shared with the CPU emulator of tests/cuda_emu).
#include "lora_kernels.h"
#include "lora_small_m_bwd.cuh"

namespace peft_kernels {

SmallMPlan plan_lora_small_m_bwd(int64_t M, int64_t K, int64_t N, bool need_dx) {
  const small_m_bwd::Plan p = small_m_bwd::plan(M, K, N, sm_count(), need_dx);
  return {p.groups, p.splits, p.producers, p.tiles};
}

void launch_lora_small_m_bwd(const SmallMBwdArgs& args, const SmallMPlan& plan, DType dt, cudaStream_t stream) {
  const small_m_bwd::Params p = small_m_bwd::make_params(
      args.dy, args.x, args.w, args.a, args.b, args.u, args.seed, args.dx, args.da, args.db, args.part, args.vpart,
      args.v, args.counters, args.M, args.K, args.N, args.r, args.dx != nullptr, args.s, args.dropout_p,
      {plan.groups, plan.splits, plan.producers, plan.tiles});
  const dim3 grid(static_cast<unsigned>(plan.producers + plan.groups * plan.splits));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    switch (plan.tiles) {
      case 1: small_m_bwd::lora_small_m_bwd_kernel<T, 1><<<grid, small_m_bwd::kThreads, 0, stream>>>(p); break;
      case 2: small_m_bwd::lora_small_m_bwd_kernel<T, 2><<<grid, small_m_bwd::kThreads, 0, stream>>>(p); break;
      default: small_m_bwd::lora_small_m_bwd_kernel<T, 4><<<grid, small_m_bwd::kThreads, 0, stream>>>(p); break;
    }
  };
  if (dt == DType::BF16) go(dev::bf16{});
  else go(dev::f16{});
}

}  // namespace peft_kernels
