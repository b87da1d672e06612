// The LoRA backward for few tokens (M <= 64) in one kernel, the partner of lora_small_m.cuh:
//     v  = dY B                                  [M, r] fp32
//     dB = s dY^T u                              [N, r]
//     dA = s / (1 - p) v^T mask(x)               [r, K]
//     dX = dY W + s / (1 - p) mask (v A)         [M, K]   (when needed)
// dY W reads W once at memory speed, as cuBLAS's dY·W does, and everything else rides along:
//   - "producer" blocks (the lowest block indices) each own a range of W's rows n: v's partial sums
//     over it and dB's rows there (each row of dB complete in one block: no atomics);
//   - "main" blocks own 64 columns of dX and a range of n (split K of the product): W's tile is
//     staged through shared memory, where the k pairs of the mma operand (consecutive n at one
//     column) are read out transposed; partial products go to an fp32 workspace;
//   - the last main block of a column group sums the partials in split order, waits for v and
//     writes dX's and dA's columns there (the dropout mask hashed once per element, in the block).
// Deterministic; fp16 / bf16; K % 8 == 0 and N % 8 == 0 (16-byte rows of W and dY), r <= 64.
#pragma once
#include <cstdint>

#include "lora_small_m.cuh"

namespace peft_kernels {
namespace small_m_bwd {

using small_m::kMaxRank;
using small_m::kThreads;
using small_m::kWarps;

constexpr int kCols = 64;    // columns of dX per main block: 4 warps x 2 n8 tiles
constexpr int kNStep = 32;   // rows n of W per staged tile (one 16-byte dY load per lane and row)
constexpr int kStages = 2;   // tiles staged per barrier pair
constexpr int kPad = 66;     // shared row stride in halves: 33 words, so the transposed fragment
                             // reads of the four t-lanes of a column fall in distinct banks
constexpr int kVecs = kStages * kNStep * kCols / 8 / kThreads;  // 16-byte loads per thread per stage: 4

struct Params {
  const void* dy;    // [M, N]
  const void* x;     // [M, K]
  const void* w;     // [N, K]
  const void* a;     // lora_A [r, K]
  const void* b;     // lora_B [N, r]
  const float* u;    // [M, r], the forward's dropout(x) A^T (times 1 / (1 - p))
  const int64_t* seed;
  void* dx;          // [M, K] out (need_dx)
  void* da;          // [r, K] out
  void* db;          // [N, r] out
  float* part;       // [splits, M, K] workspace
  float* vpart;      // [producers, M, r] workspace
  float* v;          // [M, r] workspace
  int* counters;     // [groups + 2] zeroed
  int64_t M, K, N, r;
  int groups, splits, producers;
  bool need_dx;
  float s, inv_keep;
  uint32_t threshold;
};

struct Plan {
  int groups, splits, producers, tiles;
  int blocks() const { return producers + groups * splits; }
};

inline Plan plan(int64_t M, int64_t K, int64_t N, int sms, bool need_dx) {
  Plan p{};
  p.tiles = M <= 16 ? 1 : M <= 32 ? 2 : 4;
  p.groups = static_cast<int>((K + kCols - 1) / kCols);
  const int64_t steps = (N + kNStep - 1) / kNStep;
  int64_t splits = (4 * static_cast<int64_t>(sms) + p.groups - 1) / p.groups;
  const int64_t most = steps / (2 * kStages) > 0 ? steps / (2 * kStages) : 1;
  p.splits = need_dx ? static_cast<int>(splits < 1 ? 1 : splits > most ? most : splits) : 1;
  const int64_t producers = N / 512;
  p.producers = static_cast<int>(producers < 1 ? 1 : producers > 16 ? 16 : producers);
  return p;
}

inline Params make_params(const void* dy, const void* x, const void* w, const void* a, const void* b, const float* u,
                          const int64_t* seed, void* dx, void* da, void* db, float* part, float* vpart, float* v,
                          int* counters, int64_t M, int64_t K, int64_t N, int64_t r, bool need_dx, float s,
                          double dropout_p, const Plan& plan) {
  Params p{};
  p.dy = dy; p.x = x; p.w = w; p.a = a; p.b = b; p.u = u; p.seed = seed;
  p.dx = dx; p.da = da; p.db = db; p.part = part; p.vpart = vpart; p.v = v; p.counters = counters;
  p.M = M; p.K = K; p.N = N; p.r = r;
  p.groups = plan.groups; p.splits = plan.splits; p.producers = plan.producers;
  p.need_dx = need_dx;
  p.s = s;
  p.inv_keep = static_cast<float>(dropout_p > 0 ? 1.0 / (1.0 - dropout_p) : 1.0);
  p.threshold = mask::keep_threshold(dropout_p);
  return p;
}

// Producer i: v's partial sums and dB's rows over its range of n; the last producer writes v.
template <typename T>
PK_DEVICE void produce(const Params& p, int i, int* flag) {
  const int tid = static_cast<int>(dev::thread_index());
  int64_t lo, hi;
  small_m::split_range(p.N, p.producers, i, lo, hi);
  const T* dy = static_cast<const T*>(p.dy);
  const T* B = static_cast<const T*>(p.b);
  for (int64_t idx = tid; idx < p.M * p.r; idx += kThreads) {
    const int64_t m = idx / p.r, j = idx % p.r;
    float acc = 0.f;
    for (int64_t n = lo; n < hi; ++n) acc += dev::to_f(dy[m * p.N + n]) * dev::to_f(B[n * p.r + j]);
    p.vpart[(static_cast<int64_t>(i) * p.M + m) * p.r + j] = acc;
  }
  for (int64_t idx = tid; idx < (hi - lo) * p.r; idx += kThreads) {
    const int64_t n = lo + idx / p.r, j = idx % p.r;
    float acc = 0.f;
    for (int64_t m = 0; m < p.M; ++m) acc += dev::to_f(dy[m * p.N + n]) * p.u[m * p.r + j];
    static_cast<T*>(p.db)[n * p.r + j] = dev::from_f<T>(p.s * acc);
  }
  if (small_m::last_to_arrive(&p.counters[p.groups], p.producers, nullptr, flag))
    small_m::sum_parts_and_release(p.vpart, p.producers, p.M * p.r, 1.f, p.v, &p.counters[p.groups + 1]);
}

// The 16-byte vectors of W a thread stages for tiles [step0, step0 + kStages) of column group c0.
PK_DEVICE void load_stage(dev::u32x4 (&vec)[kVecs], const Params& p, int64_t step0, int64_t hi, int64_t c0, int tid) {
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int id = tid + i * kThreads, stage = id / (kNStep * kCols / 8), row = id / (kCols / 8) % kNStep;
    const int64_t step = step0 + stage, n = step * kNStep + row, c = c0 + id % (kCols / 8) * 8;
    vec[i] = step < hi ? small_m::load_row8<true>(p.w, n, p.N, p.K, c) : small_m::zero16();
  }
}

PK_DEVICE void store_stage(uint16_t* ws /* [kStages][kNStep][kPad] */, const dev::u32x4 (&vec)[kVecs], int tid) {
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int id = tid + i * kThreads, row = id / (kCols / 8), col = id % (kCols / 8) * 8;  // row: stage * kNStep + n
    uint32_t* dst = reinterpret_cast<uint32_t*>(ws + row * kPad + col);  // 4-byte aligned (kPad even)
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[e] = dev::word(vec[i], e);
  }
}

// Two consecutive rows n, n + 1 of the staged tile at column c, as one k pair of the mma operand.
PK_DEVICE uint32_t column_pair(const uint16_t* tile, int n, int c) {
  return static_cast<uint32_t>(tile[n * kPad + c]) | (static_cast<uint32_t>(tile[(n + 1) * kPad + c]) << 16);
}

template <typename T, int MT>
PK_DEVICE void main_block(const Params& p, int group, int split, uint16_t* ws, float* vs, uint8_t* keep_s,
                          int* flag) {
  const int tid = static_cast<int>(dev::thread_index()), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t c0 = static_cast<int64_t>(group) * kCols;
  if (p.need_dx) {
    int64_t lo, hi;
    small_m::split_range((p.N + kNStep - 1) / kNStep, p.splits, split, lo, hi);
    float acc[MT][2][4] = {};
    dev::u32x4 vec[kVecs];
    if (lo < hi) load_stage(vec, p, lo, hi, c0, tid);
    for (int64_t s0 = lo; s0 < hi; s0 += kStages) {
      store_stage(ws, vec, tid);
      dev::block_sync();
      if (s0 + kStages < hi) load_stage(vec, p, s0 + kStages, hi, c0, tid);  // in flight during the mma
      for (int st = 0; st < kStages && s0 + st < hi; ++st) {
        const uint16_t* tile = ws + st * kNStep * kPad;
        dev::u32x4 yv[MT][2];  // dY's fragments: lane (g, t) holds n = 8t .. 8t + 7 of its rows
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half)
            yv[mt][half] = small_m::load_row8<false>(p.dy, mt * 16 + half * 8 + g, p.M, p.N, (s0 + st) * kNStep + 8 * t);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t bw[2][2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int c = warp * 16 + j * 8 + g;
            bw[j][0] = column_pair(tile, 8 * t + 4 * h, c);
            bw[j][1] = column_pair(tile, 8 * t + 4 * h + 2, c);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint32_t a[4] = {dev::word(yv[mt][0], 2 * h), dev::word(yv[mt][1], 2 * h),
                                   dev::word(yv[mt][0], 2 * h + 1), dev::word(yv[mt][1], 2 * h + 1)};
#pragma unroll
            for (int j = 0; j < 2; ++j) dev::mma16816(acc[mt][j], a, bw[j], T{});
          }
        }
      }
      dev::block_sync();  // the tile is read before the next stage overwrites it
    }
    float* part = p.part + static_cast<int64_t>(split) * p.M * p.K;
    const int64_t k0 = c0 + warp * 16;
    small_m::for_each_acc(acc, g, t, [&](int m, int col, float v) {
      if (m < p.M && k0 + col < p.K) part[m * p.K + k0 + col] = v;
    });
  }
  // the group's last split writes the columns, once v is ready
  if (!small_m::last_to_arrive(&p.counters[group], p.splits, &p.counters[p.groups + 1], flag)) return;
  // v, and the dropout mask of this block's columns, once
  for (int64_t idx = tid; idx < p.M * p.r; idx += kThreads) vs[idx / p.r * kMaxRank + idx % p.r] = dev::load_l2(&p.v[idx]);
  for (int64_t idx = tid; idx < p.M * kCols; idx += kThreads) {
    const int64_t m = idx / kCols, k = c0 + idx % kCols;
    keep_s[idx] = p.seed == nullptr ||
                  mask::keep(mask::row_key(*p.seed, static_cast<uint32_t>(m)), static_cast<uint32_t>(k), p.threshold);
  }
  dev::block_sync();
  const T* A = static_cast<const T*>(p.a);
  const T* x = static_cast<const T*>(p.x);
  const float scale = p.s * p.inv_keep;
  if (p.need_dx)
    for (int64_t idx = tid; idx < p.M * kCols; idx += kThreads) {
      const int64_t m = idx / kCols, k = c0 + idx % kCols;
      if (k >= p.K) continue;
      float acc = 0.f;
      for (int q = 0; q < p.splits; ++q) acc += dev::load_l2(&p.part[(q * p.M + m) * p.K + k]);
      if (keep_s[idx]) {
        float lora = 0.f;
        for (int64_t j = 0; j < p.r; ++j) lora += vs[m * kMaxRank + j] * dev::to_f(A[j * p.K + k]);
        acc += scale * lora;
      }
      static_cast<T*>(p.dx)[m * p.K + k] = dev::from_f<T>(acc);
    }
  for (int64_t idx = tid; idx < p.r * kCols; idx += kThreads) {
    const int64_t j = idx / kCols, c = idx % kCols, k = c0 + c;
    if (k >= p.K) continue;
    float acc = 0.f;
    for (int64_t m = 0; m < p.M; ++m)
      if (keep_s[m * kCols + c]) acc += vs[m * kMaxRank + j] * dev::to_f(x[m * p.K + k]);
    static_cast<T*>(p.da)[j * p.K + k] = dev::from_f<T>(scale * acc);
  }
}

template <typename T, int MT>
#ifdef __CUDACC__
__global__ void __launch_bounds__(kThreads) lora_small_m_bwd_kernel(const Params p) {
#else
void lora_small_m_bwd_kernel(const Params p) {
#endif
  __shared__ uint16_t ws[kStages * kNStep * kPad];
  __shared__ float vs[small_m::kMaxTiles * 16 * kMaxRank];
  __shared__ uint8_t keep_s[small_m::kMaxTiles * 16 * kCols];
  __shared__ int flag[1];
  const int b = static_cast<int>(dev::block_index());
  if (b < p.producers) {
    produce<T>(p, b, flag);
    return;
  }
  const int i = b - p.producers;
  main_block<T, MT>(p, i / p.splits, i % p.splits, ws, vs, keep_s, flag);
}

}  // namespace small_m_bwd
}  // namespace peft_kernels
