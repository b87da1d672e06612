// The CUDA C++ LoRA backend: op registration and host code. The two big products run on cuBLAS
// (at::addmm_ with the LoRA term as the C input, beta = 1); the LoRA-specific work runs in the
// kernels of lora_kernels.cu. Ops live in the namespace peft_kernels_cuda under the same names as
// the Python-defined peft_kernels::lora_fwd / lora_bwd (minus the backend argument); the Python
// backend module peft_kernels/cuda_ext/lora.py routes backend="cuda" to them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "lora_kernels.h"

namespace peft_kernels {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "peft_kernels cuda backend: fp32/fp16/bf16 only, got ", t.scalar_type());
  }
  return DType::F32;
}

void check(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "peft_kernels cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), "peft_kernels cuda backend: ", name, " is on ", t.device(), ", x on ",
              x.device());
  TORCH_CHECK(t.dim() == dim, "peft_kernels cuda backend: ", name, " must be ", dim, "-D, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "peft_kernels cuda backend: ", name, " must be contiguous");
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "peft_kernels cuda backend: ", name, " is ", t.scalar_type(),
              ", x is ", x.scalar_type());
}

const int64_t* seed_ptr(const std::optional<at::Tensor>& seed, double p, const at::Tensor& x) {
  if (p == 0.0) return nullptr;
  TORCH_CHECK(seed.has_value(), "peft_kernels cuda backend: dropout_p > 0 needs a seed tensor");
  check(*seed, "seed", x, 1);
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "peft_kernels cuda backend: seed must be an int64 tensor [1]");
  return seed->data_ptr<int64_t>();
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                  double p) {
  check(x, "x", x, 2);
  dtype_of(x);
  check(weight, "weight", x, 2);
  check(A, "lora_A", x, 2);
  check(B, "lora_B", x, 2);
  check_same_dtype(weight, "weight", x);
  check_same_dtype(A, "lora_A", x);
  check_same_dtype(B, "lora_B", x);
  const int64_t K = x.size(1), N = weight.size(0), r = A.size(0);
  TORCH_CHECK(weight.size(1) == K, "peft_kernels cuda backend: weight is ", weight.sizes(), ", x has ", K,
              " features");
  TORCH_CHECK(A.size(1) == K && r >= 1, "peft_kernels cuda backend: lora_A must be [r >= 1, ", K, "], got ",
              A.sizes());
  TORCH_CHECK(B.size(0) == N && B.size(1) == r, "peft_kernels cuda backend: lora_B must be [", N, ", ", r,
              "], got ", B.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "peft_kernels cuda backend: dropout_p must be in [0, 1), got ", p);
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value()) return;
  check(*bias, "bias", x, 1);
  check_same_dtype(*bias, "bias", x);
  TORCH_CHECK(bias->size(0) == N, "peft_kernels cuda backend: bias must be [", N, "], got ", bias->sizes());
}

// grad_y [M, N] in x's dtype and the forward's u [M, r] fp32, for both backward ops.
void check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& u, const at::Tensor& x, int64_t M, int64_t N,
                           int64_t r) {
  check(grad_y, "grad_y", x, 2);
  check_same_dtype(grad_y, "grad_y", x);
  TORCH_CHECK(grad_y.size(0) == M && grad_y.size(1) == N, "peft_kernels cuda backend: grad_y must be [", M, ", ",
              N, "], got ", grad_y.sizes());
  check(u, "u", x, 2);
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.size(0) == M && u.size(1) == r,
              "peft_kernels cuda backend: u must be fp32 [", M, ", ", r, "]");
}

// The single-kernel ops' arrival counters, zeroed on the stream (a memset node under graph capture).
at::Tensor zeroed_counters(int64_t n, const at::Tensor& x, cudaStream_t stream) {
  auto counters = at::empty({n}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(counters.data_ptr(), 0, n * sizeof(int), stream));
  return counters;
}

// Outputs and scratch of the single-kernel forwards (lora_small_m.cuh).
struct SmallMBuffers {
  at::Tensor y, u, part, upart, counters;
};
SmallMBuffers small_m_buffers(const SmallMPlan& plan, const at::Tensor& x, int64_t M, int64_t N, int64_t r,
                              cudaStream_t stream) {
  auto f32 = x.options().dtype(at::kFloat);
  return {at::empty({M, N}, x.options()), at::empty({M, r}, f32), at::empty({plan.splits * M * N}, f32),
          at::empty({std::max<int64_t>(plan.producers * M * r, 1)}, f32), zeroed_counters(plan.groups + 2, x, stream)};
}

// Checks shared by the single-kernel ops: 16-bit x, 1 <= M <= kSmallMMaxM, r <= kSmallMMaxRank.
void check_small_m(const char* op, const at::Tensor& x, int64_t M, int64_t r) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op, "fp16 / bf16 only, got ",
              x.scalar_type());
  TORCH_CHECK(M >= 1 && M <= kSmallMMaxM, op, "1 <= M <= ", kSmallMMaxM, " tokens, got ", M);
  TORCH_CHECK(r <= kSmallMMaxRank, op, "rank <= ", kSmallMMaxRank, ", got ", r);
}

std::tuple<at::Tensor, at::Tensor> lora_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                                            const at::Tensor& B, const std::optional<at::Tensor>& bias,
                                            double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_common(x, weight, A, B, dropout_p);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  check_bias(bias, x, N);
  const int64_t* sp = seed_ptr(seed, dropout_p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto u = at::empty({M, r}, x.options().dtype(at::kFloat));
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return {y, u.zero_()};
  if (K == 0) {
    u.zero_();
  } else {
    launch_lora_down(x.data_ptr(), A.data_ptr(), sp, u.data_ptr<float>(), M, K, r, dropout_p, dtype_of(x), stream);
  }
  launch_lora_up(u.data_ptr<float>(), B.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), M,
                 N, r, static_cast<float>(scaling), dtype_of(x), stream);
  y.addmm_(x, weight.t());  // cuBLAS; y (bias + LoRA term) is its C input
  return {y, u};
}

// The same op in one kernel for few tokens (lora_small_m.cuh); the Python backend calls it where
// its rule applies (peft_kernels/cuda_backend/lora.py), and it refuses anything else.
std::tuple<at::Tensor, at::Tensor> lora_fwd_small_m(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& A, const at::Tensor& B,
                                                    const std::optional<at::Tensor>& bias, double scaling,
                                                    double dropout_p, const std::optional<at::Tensor>& seed) {
  check_common(x, weight, A, B, dropout_p);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  const char* op = "peft_kernels cuda backend lora_fwd_small_m: ";
  check_small_m(op, x, M, r);
  TORCH_CHECK(N >= 1, op, "out_features must be >= 1");
  TORCH_CHECK(K >= 8 && K % 8 == 0, op, "in_features must be a positive multiple of 8, got ", K);
  for (const at::Tensor* t : {&x, &weight, &A})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op, "x, weight and lora_A must be 16-byte aligned");
  check_bias(bias, x, N);
  const int64_t* sp = seed_ptr(seed, dropout_p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const SmallMPlan plan = plan_lora_small_m(M, K, N, r, false);
  SmallMBuffers o = small_m_buffers(plan, x, M, N, r, stream);
  const SmallMArgs args{x.data_ptr(), weight.data_ptr(), A.data_ptr(), B.data_ptr(),
                        bias.has_value() ? bias->data_ptr() : nullptr, sp, o.y.data_ptr(), o.u.data_ptr<float>(),
                        o.part.data_ptr<float>(), o.upart.data_ptr<float>(), o.counters.data_ptr<int>(), M, K, N, r,
                        static_cast<float>(scaling), dropout_p, nullptr, nullptr, nullptr, nullptr, nullptr,
                        nullptr, 0};
  launch_lora_small_m_fwd(args, plan, dtype_of(x), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {o.y, o.u};
}

// The same kernel over a frozen bitsandbytes 4-bit weight (decoded in registers): qweight =
// [packed, absmax, code] or [packed, absmax (uint8), code, absmax2, code2, offset], shape = [N, K].
// lora_A [0, K] / lora_B [N, 0] (r = 0): the frozen layer alone (quant_linear).
std::tuple<at::Tensor, at::Tensor> qlora_fwd_small_m(const at::Tensor& x, at::TensorList qweight, int64_t blocksize,
                                                     at::IntArrayRef shape, const at::Tensor& A, const at::Tensor& B,
                                                     const std::optional<at::Tensor>& bias, double scaling,
                                                     double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "peft_kernels cuda backend qlora_fwd_small_m: ";
  check(x, "x", x, 2);
  TORCH_CHECK(shape.size() == 2, op, "shape must be [out, in]");
  const int64_t M = x.size(0), K = x.size(1), N = shape[0], r = A.size(0);
  check_small_m(op, x, M, r);
  TORCH_CHECK(shape[1] == K, op, "x has ", K, " features, the weight ", shape[1]);
  TORCH_CHECK(N >= 1, op, "out_features must be >= 1");
  TORCH_CHECK(blocksize >= 32 && (blocksize & (blocksize - 1)) == 0 && K % blocksize == 0, op,
              "blocksize must be a power of two >= 32 dividing in_features, got ", blocksize, " for ", K);
  TORCH_CHECK(qweight.size() == 3 || qweight.size() == 6, op, "qweight must hold 3 or 6 tensors");
  const bool nested = qweight.size() == 6;
  const at::Tensor &packed = qweight[0], &absmax = qweight[1], &code = qweight[2];
  const int64_t blocks = N * K / blocksize;
  for (const at::Tensor* t : {&packed, &absmax, &code}) check(*t, "qweight part", x, t->dim());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == N * K / 2, op, "packed must be uint8 [",
              N * K / 2, "]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              op, "x and the packed weight must be 16-byte aligned");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, op, "code must be fp32 [16]");
  TORCH_CHECK(absmax.numel() == blocks && absmax.scalar_type() == (nested ? at::kByte : at::kFloat), op,
              "absmax must be ", nested ? "uint8" : "fp32", " [", blocks, "]");
  if (nested) {
    for (int i = 3; i < 6; ++i) check(qweight[i], "qweight part", x, qweight[i].dim());
    TORCH_CHECK(qweight[3].scalar_type() == at::kFloat && qweight[3].numel() == (blocks + 255) / 256, op,
                "absmax2 must be fp32 [", (blocks + 255) / 256, "]");
    TORCH_CHECK(qweight[4].scalar_type() == at::kFloat && qweight[4].numel() == 256, op, "code2 must be fp32 [256]");
    TORCH_CHECK(qweight[5].scalar_type() == at::kFloat && qweight[5].numel() == 1, op, "offset must be fp32 [1]");
  }
  if (r > 0) {
    check(A, "lora_A", x, 2);
    check(B, "lora_B", x, 2);
    check_same_dtype(A, "lora_A", x);
    check_same_dtype(B, "lora_B", x);
    TORCH_CHECK(A.size(1) == K && B.size(0) == N && B.size(1) == r, op, "lora_A must be [r, ", K, "] and lora_B [",
                N, ", r], got ", A.sizes(), ", ", B.sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(A.data_ptr()) % 16 == 0, op, "lora_A must be 16-byte aligned");
  }
  check_bias(bias, x, N);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, "dropout_p must be in [0, 1), got ", dropout_p);
  const int64_t* sp = r > 0 ? seed_ptr(seed, dropout_p, x) : nullptr;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const SmallMPlan plan = plan_lora_small_m(M, K, N, r, true);
  SmallMBuffers o = small_m_buffers(plan, x, M, N, r, stream);
  SmallMArgs args{x.data_ptr(), nullptr, r > 0 ? A.data_ptr() : nullptr, r > 0 ? B.data_ptr() : nullptr,
                  bias.has_value() ? bias->data_ptr() : nullptr, sp, o.y.data_ptr(), o.u.data_ptr<float>(),
                  o.part.data_ptr<float>(), o.upart.data_ptr<float>(), o.counters.data_ptr<int>(), M, K, N, r,
                  static_cast<float>(scaling), dropout_p, packed.data_ptr<uint8_t>(), absmax.data_ptr(),
                  nested ? qweight[3].data_ptr<float>() : nullptr, code.data_ptr<float>(),
                  nested ? qweight[4].data_ptr<float>() : nullptr, nested ? qweight[5].data_ptr<float>() : nullptr,
                  blocksize};
  launch_lora_small_m_fwd(args, plan, dtype_of(x), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {o.y, o.u};
}

// The backward for few tokens in one kernel (lora_small_m_bwd.cuh); same contract as lora_bwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_bwd_small_m(const at::Tensor& grad_y, const at::Tensor& x,
                                                                const at::Tensor& weight, const at::Tensor& A,
                                                                const at::Tensor& B, const at::Tensor& u,
                                                                double scaling, double dropout_p,
                                                                const std::optional<at::Tensor>& seed, bool need_dx) {
  check_common(x, weight, A, B, dropout_p);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  const char* op = "peft_kernels cuda backend lora_bwd_small_m: ";
  check_backward_inputs(grad_y, u, x, M, N, r);
  check_small_m(op, x, M, r);
  TORCH_CHECK(K >= 8 && K % 8 == 0 && N >= 8 && N % 8 == 0, op,
              "in_features and out_features must be positive multiples of 8, got ", K, " and ", N);
  for (const at::Tensor* t : {&grad_y, &weight})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op, "grad_y and weight must be 16-byte aligned");
  const int64_t* sp = seed_ptr(seed, dropout_p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const SmallMPlan plan = plan_lora_small_m_bwd(M, K, N, need_dx);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  auto da = at::empty({r, K}, x.options());
  auto db = at::empty({N, r}, x.options());
  auto part = at::empty({need_dx ? plan.splits * M * K : 1}, f32);
  auto vpart = at::empty({plan.producers * M * r}, f32);
  auto v = at::empty({M * r}, f32);
  auto counters = zeroed_counters(plan.groups + 2, x, stream);
  const SmallMBwdArgs args{grad_y.data_ptr(), x.data_ptr(), weight.data_ptr(), A.data_ptr(), B.data_ptr(),
                           u.data_ptr<float>(), sp, need_dx ? dx.data_ptr() : nullptr, da.data_ptr(), db.data_ptr(),
                           part.data_ptr<float>(), vpart.data_ptr<float>(), v.data_ptr<float>(),
                           counters.data_ptr<int>(), M, K, N, r, static_cast<float>(scaling), dropout_p};
  launch_lora_small_m_bwd(args, plan, dtype_of(x), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, da, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& A,
                                                        const at::Tensor& B, const at::Tensor& u, double scaling,
                                                        double dropout_p, const std::optional<at::Tensor>& seed,
                                                        bool need_dx) {
  check_common(x, weight, A, B, dropout_p);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  check_backward_inputs(grad_y, u, x, M, N, r);
  const int64_t* sp = seed_ptr(seed, dropout_p, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float s = static_cast<float>(scaling);
  auto v = at::zeros({M, r}, x.options().dtype(at::kFloat));
  auto gB = at::zeros({N, r}, x.options().dtype(at::kFloat));
  auto gA_t = at::zeros({K, r}, x.options().dtype(at::kFloat));  // dA^T: threads run along K
  if (M > 0 && N > 0) {
    launch_lora_dy(grad_y.data_ptr(), B.data_ptr(), v.data_ptr<float>(), M, N, r, dtype_of(x), stream);
    launch_lora_weight_grad(grad_y.data_ptr(), u.data_ptr<float>(), nullptr, gB.data_ptr<float>(), M, N, r, s, 0.0,
                            dtype_of(x), stream);
  }
  if (M > 0 && K > 0)
    launch_lora_weight_grad(x.data_ptr(), v.data_ptr<float>(), sp, gA_t.data_ptr<float>(), M, K, r, s, dropout_p,
                            dtype_of(x), stream);
  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    dx = at::empty({M, K}, x.options());
    if (M > 0 && K > 0) {
      launch_lora_dx(v.data_ptr<float>(), A.data_ptr(), sp, dx.data_ptr(), M, K, r, s, dropout_p, dtype_of(x), stream);
      dx.addmm_(grad_y, weight);  // cuBLAS: dY @ W on top of the LoRA part
    }
  }
  // dA leaves contiguous, as the op's fake (meta) function says: .to() of the transposed view
  // kept its column-major strides, which torch.compile's stride assertions rejected
  auto gA = at::empty({r, K}, A.options());
  gA.copy_(gA_t.t());
  return {dx, gA, gB.to(B.scalar_type())};
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY(peft_kernels_cuda, m) {
  m.def("lora_fwd(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
        "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("lora_fwd_small_m(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
        "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("qlora_fwd_small_m(Tensor x, Tensor[] qweight, int blocksize, int[] shape, Tensor lora_A, Tensor lora_B, "
        "Tensor? bias, float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("lora_bwd_small_m(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, float dropout_p, Tensor? seed, bool need_dx) -> (Tensor, Tensor, Tensor)");
  m.def("lora_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, float scaling, "
        "float dropout_p, Tensor? seed, bool need_dx) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels_cuda, CUDA, m) {
  m.impl("lora_fwd", &peft_kernels::lora_fwd);
  m.impl("lora_fwd_small_m", &peft_kernels::lora_fwd_small_m);
  m.impl("qlora_fwd_small_m", &peft_kernels::qlora_fwd_small_m);
  m.impl("lora_bwd_small_m", &peft_kernels::lora_bwd_small_m);
  m.impl("lora_bwd", &peft_kernels::lora_bwd);
}
