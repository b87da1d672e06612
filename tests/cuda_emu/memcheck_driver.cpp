// A memcheck of the CUDA kernels' index arithmetic (the small-M kernels and the LoRA pieces around
// cuBLAS): the kernels run in the CPU emulator on
// buffers of exactly their documented sizes (each its own heap allocation), built with
// AddressSanitizer / UBSan by tests/test_cuda_small_m_emulated.py, so any read or write outside
// x, W, the packed weight, absmax, A, B, bias, u, the outputs or the workspaces aborts with a
// report — what compute-sanitizer memcheck checks on a GPU. The values are random; correctness is
// the other tests' business. Prints "ok" and exits 0 when every case ran clean.
#include <cstdio>
#include <random>

#include "emu.h"
#include "lora_kernels_emu.h"

#include "../../csrc/lora_small_m.cuh"
#include "../../csrc/lora_small_m_bwd.cuh"

namespace sm = peft_kernels::small_m;
namespace smb = peft_kernels::small_m_bwd;
using T = peft_kernels_emu::bf16;

static std::mt19937 rng(0);

static std::vector<T> rand16(size_t n) {
  std::normal_distribution<float> d;
  std::vector<T> v(n);
  for (auto& e : v) e = peft_kernels_emu::from_f<T>(d(rng));
  return v;
}
static std::vector<float> randf(size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& e : v) e = d(rng);
  return v;
}

template <int MT, bool Q>
static void forward(int64_t M, int64_t K, int64_t N, int64_t r, bool nested, int64_t blocksize, int splits) {
  auto x = rand16(M * K), w = rand16(Q ? 0 : N * K), a = rand16(r * K), b = rand16(N * r), bias = rand16(N);
  std::vector<uint8_t> packed(Q ? N * K / 2 : 0), absmax_q(Q && nested ? N * K / blocksize : 0);
  for (auto& e : packed) e = static_cast<uint8_t>(rng());
  for (auto& e : absmax_q) e = static_cast<uint8_t>(rng());
  auto absmax = randf(Q && !nested ? N * K / blocksize : 0, 0.1f, 2.f);
  auto absmax2 = randf(Q && nested ? (N * K / blocksize + 255) / 256 : 0, 0.1f, 2.f);
  auto code = randf(16), code2 = randf(256), offset = randf(1);
  const int64_t seed = 7;
  sm::Plan plan = sm::plan(M, K, N, r, 2, Q);
  plan.splits = splits;
  std::vector<T> y(M * N);
  std::vector<float> u(M * r), part(plan.splits * M * N), upart(plan.producers * M * r);
  std::vector<int> counters(plan.groups + 2, 0);
  const void* absmax_p = nested ? static_cast<const void*>(absmax_q.data()) : static_cast<const void*>(absmax.data());
  const sm::Params p = sm::make_params(x.data(), Q ? nullptr : w.data(), r ? a.data() : nullptr, r ? b.data() : nullptr,
                                       bias.data(), &seed, y.data(), u.data(), part.data(), upart.data(),
                                       counters.data(), M, K, N, r, 1.f, 0.1, Q ? packed.data() : nullptr, absmax_p,
                                       nested ? absmax2.data() : nullptr, code.data(), code2.data(), offset.data(),
                                       blocksize, plan);
  peft_kernels_emu::launch(plan.blocks(), sm::kThreads, [&] { sm::lora_small_m_fwd_kernel<T, MT, Q>(p); });
}

template <int MT>
static void backward(int64_t M, int64_t K, int64_t N, int64_t r, bool need_dx, int splits) {
  auto dy = rand16(M * N), x = rand16(M * K), w = rand16(N * K), a = rand16(r * K), b = rand16(N * r);
  auto u = randf(M * r);
  const int64_t seed = 9;
  smb::Plan plan = smb::plan(M, K, N, 2, need_dx);
  if (need_dx) plan.splits = splits;
  std::vector<T> dx(need_dx ? M * K : 0), da(r * K), db(N * r);
  std::vector<float> part(need_dx ? plan.splits * M * K : 0), vpart(plan.producers * M * r), v(M * r);
  std::vector<int> counters(plan.groups + 2, 0);
  const smb::Params p = smb::make_params(dy.data(), x.data(), w.data(), a.data(), b.data(), u.data(), &seed,
                                         need_dx ? dx.data() : nullptr, da.data(), db.data(), part.data(),
                                         vpart.data(), v.data(), counters.data(), M, K, N, r, need_dx, 1.f, 0.1, plan);
  peft_kernels_emu::launch(plan.blocks(), smb::kThreads, [&] { smb::lora_small_m_bwd_kernel<T, MT>(p); });
}

// The five LoRA pieces of csrc/lora_kernels.cu through lora_kernels_emu.cpp's entries (each body
// with its launch plan and exactly its dynamic shared memory), forward and backward, the weight
// gradients split in token slices for `sms` multiprocessors.
static void pieces(int64_t M, int64_t K, int64_t N, int64_t r, int sms) {
  auto x = rand16(M * K), a = rand16(r * K), b = rand16(N * r), bias = rand16(N), dy = rand16(M * N);
  const int64_t seed = 11;
  const int bf = 2;  // lora_kernels.h DType::BF16, T here
  std::vector<float> u(M * r), v(M * r), grad_b(N * r), grad_a_t(K * r);
  std::vector<T> c(M * N), d(M * K);
  emu_lora_down(bf, x.data(), a.data(), &seed, u.data(), M, K, r, 0.1);
  emu_lora_up(bf, u.data(), b.data(), bias.data(), c.data(), M, N, r, 1.f);
  emu_lora_dy(bf, dy.data(), b.data(), v.data(), M, N, r);
  emu_lora_weight_grad(bf, dy.data(), u.data(), nullptr, grad_b.data(), M, N, r, 1.f, 0.0, sms);
  emu_lora_weight_grad(bf, x.data(), v.data(), &seed, grad_a_t.data(), M, K, r, 1.f, 0.1, sms);
  emu_lora_dx(bf, v.data(), a.data(), &seed, d.data(), M, K, r, 1.f, 0.1);
}

int main() {
  forward<1, false>(3, 40, 13, 5, false, 0, 3);    // N not a multiple of 8, K not of 32
  forward<4, false>(49, 72, 70, 64, false, 0, 2);
  forward<1, true>(5, 96, 19, 3, true, 32, 4);     // 4-bit, nested, a half 128-step
  forward<2, true>(17, 256, 9, 0, false, 128, 1);  // 4-bit, plain absmax, no adapter
  backward<1>(3, 40, 24, 5, true, 3);              // a partial 64-column group, empty splits
  backward<4>(50, 136, 72, 64, true, 2);
  backward<2>(20, 72, 8, 7, false, 1);
  pieces(3, 300, 260, 17, 1);                      // K, N past a block of 256 threads, a partial rank block
  pieces(7, 40, 9, 1, 64);                          // a token slice per row
  std::puts("ok");
  return 0;
}
