// Instantiations and the launcher of the single-kernel LoRA forward for few tokens
// (lora_small_m.cuh: the kernel and its plan, shared with the CPU emulator of tests/cuda_emu).
#include "lora_kernels.h"
#include "lora_small_m.cuh"

#include <type_traits>

namespace peft_kernels {

SmallMPlan plan_lora_small_m(int64_t M, int64_t K, int64_t N, int64_t r, bool quant) {
  const small_m::Plan p = small_m::plan(M, K, N, r, sm_count(), quant);
  return {p.groups, p.splits, p.producers, p.tiles};
}

void launch_lora_small_m_fwd(const SmallMArgs& args, const SmallMPlan& plan, DType dt, cudaStream_t stream) {
  const small_m::Params p = small_m::make_params(args.x, args.w, args.a, args.b, args.bias, args.seed, args.y,
                                                  args.u, args.part, args.upart, args.counters, args.M, args.K,
                                                  args.N, args.r, args.s, args.dropout_p, args.packed, args.absmax,
                                                  args.absmax2, args.code, args.code2, args.offset, args.blocksize,
                                                  {plan.groups, plan.splits, plan.producers, plan.tiles, 0});
  const dim3 grid(static_cast<unsigned>(plan.producers + plan.groups * plan.splits));
  auto go = [&](auto tag, auto quant) {
    using T = decltype(tag);
    constexpr bool Q = decltype(quant)::value;
    switch (plan.tiles) {
      case 1: small_m::lora_small_m_fwd_kernel<T, 1, Q><<<grid, small_m::kThreads, 0, stream>>>(p); break;
      case 2: small_m::lora_small_m_fwd_kernel<T, 2, Q><<<grid, small_m::kThreads, 0, stream>>>(p); break;
      default: small_m::lora_small_m_fwd_kernel<T, 4, Q><<<grid, small_m::kThreads, 0, stream>>>(p); break;
    }
  };
  using Dense = std::integral_constant<bool, false>;
  using Quant = std::integral_constant<bool, true>;
  if (dt == DType::BF16) args.packed ? go(dev::bf16{}, Quant{}) : go(dev::bf16{}, Dense{});
  else args.packed ? go(dev::f16{}, Quant{}) : go(dev::f16{}, Dense{});
}

}  // namespace peft_kernels
