// The LoRA forward for few tokens (M <= 64) in one kernel on tensor cores:
//     y = x W^T + bias + s * u B^T,   u = dropout(x) A^T   (u [M, r] fp32 is also an output)
// At M = 16 a plain F.linear is a read of W at memory speed; the three-launch path (down kernel,
// up kernel, cuBLAS with the LoRA term as its C input) adds two launches and an [M, N] round trip
// (benchmarks/results/lora_backends_h100.json: 1.52x F.linear graphed with Triton, 2.18x with the
// CUDA C++ pieces). Here:
//   - "main" blocks own 64 rows of W and one range of K (split-K: enough blocks to keep every SM
//     streaming W), multiply with mma.sync m16n8k16 from registers and store an fp32 partial tile;
//   - "producer" blocks (the lowest block indices, so they are scheduled first) reduce u over
//     ranges of K, each element of x hashed for dropout and lora_A read once in the whole launch;
//   - the last main block of a row group to arrive (a counter) sums the partials in split order,
//     waits for u (a flag the last producer releases), adds s * u B^T + bias and writes y once.
// Deterministic: every sum runs in a fixed order. Needs K % 8 == 0 and 16-byte aligned x, W, A
// (one 16-byte load feeds two k16 steps); fp16 / bf16; r <= 64 (r = 0: no adapter, no producers).
//
// The same kernel over a frozen 4-bit weight (bitsandbytes NF4 / FP4, kQuant): the main blocks
// decode W in registers (never in memory) from 16-byte loads of packed codes, 32 consecutive
// weights per lane, one scale per lane and quantization block (blocksize >= 32, K % blocksize
// == 0), fp32 code * scale rounded once to x's dtype as the reference dequantize does.
//
// Fragments: lane (g = lane / 4, t = lane % 4) loads x[g][k + 8t .. k + 8t + 8) and
// W[n + g][k + 8t .. k + 8t + 8) for a 32-wide step of K. The reduction order within a step is
// free, so both operands use the same permutation of k: the mma of half h (0, 1) takes words
// (2h, 2h + 1) of each 16-byte vector as its k pairs (2t, 2t + 1) and (2t + 8, 2t + 9).
#pragma once
#include <cstdint>

#include "device_compat.cuh"
#include "dropout_mask.cuh"

namespace peft_kernels {
namespace small_m {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpTiles = 2;                       // n8 tiles of W per warp
constexpr int kGroupRows = kWarps * kWarpTiles * 8;  // rows of W per main block: 64
constexpr int kStep = 32;                           // K per 16-byte load
constexpr int kUnroll = 4;                          // steps in flight per warp
constexpr int kMaxRank = 64;
constexpr int kMaxTiles = 4;                        // m16 tiles: M <= 64
constexpr int kQuantStep = 128;                     // K per 16-byte load of packed 4-bit codes
constexpr int kQuantUnroll = 2;

struct Params {
  const void* x;     // [M, K]
  const void* w;     // [N, K]
  const void* a;     // lora_A [r, K]
  const void* b;     // lora_B [N, r]
  const void* bias;  // [N] or null
  const int64_t* seed;  // device int64 [1], or null without dropout
  void* y;           // [M, N] out
  float* u;          // [M, r] out: dropout(x) A^T (times 1 / (1 - p))
  float* part;       // [splits, M, N] workspace
  float* upart;      // [producers, M, r] workspace
  int* counters;     // [groups + 2] zeroed: per group arrivals, producer arrivals, u ready
  // kQuant: W [N, K] as bitsandbytes 4-bit parts (w unused): packed codes [N * K / 2] (even element
  // in the high nibble), absmax fp32 [N * K / blocksize], or uint8 with absmax2 fp32, code2 fp32
  // [256] and offset fp32 [1] (double quantization: scale = code2[q] * absmax2[b / 256] + offset)
  const uint8_t* packed;
  const void* absmax;
  const float* absmax2;
  const float* code;
  const float* code2;
  const float* offset;
  int blocksize_log2;
  int64_t M, K, N, r;
  int groups, splits, producers;
  float s, inv_keep;
  uint32_t threshold;
};

// The launch shape for M tokens on a GPU with `sms` multiprocessors (host and emulator alike).
struct Plan {
  int groups, splits, producers, tiles;  // tiles: m16 tiles (template argument)
  int64_t steps;                         // 32-wide steps of K
  int blocks() const { return producers + groups * splits; }
};

inline Plan plan(int64_t M, int64_t K, int64_t N, int64_t r, int sms, bool quant) {
  Plan p{};
  p.tiles = M <= 16 ? 1 : M <= 32 ? 2 : 4;
  const int step = quant ? kQuantStep : kStep, unroll = quant ? kQuantUnroll : kUnroll;
  p.steps = (K + step - 1) / step;
  p.groups = static_cast<int>((N + kGroupRows - 1) / kGroupRows);
  // about four resident blocks per SM streaming W, each with >= `unroll` steps of K
  int64_t splits = (4 * static_cast<int64_t>(sms) + p.groups - 1) / p.groups;
  const int64_t most = p.steps / unroll > 0 ? p.steps / unroll : 1;
  p.splits = static_cast<int>(splits < 1 ? 1 : splits > most ? most : splits);
  int64_t producers = (K + kStep - 1) / kStep / 16;  // >= 512 of K each: done long before the main blocks
  p.producers = r == 0 ? 0 : static_cast<int>(producers < 1 ? 1 : producers > 16 ? 16 : producers);
  return p;
}

inline int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// Params from the launch's arguments and plan (host and emulator alike); packed = null: dense W.
inline Params make_params(const void* x, const void* w, const void* a, const void* b, const void* bias,
                          const int64_t* seed, void* y, float* u, float* part, float* upart, int* counters, int64_t M,
                          int64_t K, int64_t N, int64_t r, float s, double dropout_p, const uint8_t* packed,
                          const void* absmax, const float* absmax2, const float* code, const float* code2,
                          const float* offset, int64_t blocksize, const Plan& plan) {
  Params p{};
  p.x = x; p.w = w; p.a = a; p.b = b; p.bias = bias; p.seed = seed; p.y = y; p.u = u; p.part = part;
  p.upart = upart; p.counters = counters;
  p.packed = packed; p.absmax = absmax; p.absmax2 = absmax2; p.code = code; p.code2 = code2; p.offset = offset;
  p.blocksize_log2 = packed ? log2_exact(blocksize) : 0;
  p.M = M; p.K = K; p.N = N; p.r = r;
  p.groups = plan.groups; p.splits = plan.splits; p.producers = plan.producers;
  p.s = s;
  p.inv_keep = static_cast<float>(dropout_p > 0 ? 1.0 / (1.0 - dropout_p) : 1.0);
  p.threshold = mask::keep_threshold(dropout_p);
  return p;
}

// [lo, hi) of `total` steps for part `i` of `n` (the first total % n parts get one more).
PK_DEVICE void split_range(int64_t total, int n, int i, int64_t& lo, int64_t& hi) {
  const int64_t base = total / n, extra = total % n;
  lo = i * base + (i < extra ? i : extra);
  hi = lo + base + (i < extra ? 1 : 0);
}

PK_DEVICE dev::u32x4 zero16() { return dev::u32x4{0u, 0u, 0u, 0u}; }

// Wait (one thread) until producer blocks release `flag`. They have the lowest block indices, so
// they were scheduled first and never wait themselves; a wait of seconds (2^24 backoffs) is a bug,
// and traps instead of hanging the process.
PK_DEVICE void wait_released(const int* flag) {
  for (int spins = 0; dev::load_acquire(flag) == 0; ++spins) {
    if (spins == 1 << 24) dev::fail();
    dev::backoff();
  }
}

// Called by every thread of a block after its stores: thread 0 counts the block in at `counter`
// (those stores visible to whoever sees the new count). True, in every thread, for the last of
// `count` blocks to arrive, which has also waited for `ready` to be released (when not null).
PK_DEVICE bool last_to_arrive(int* counter, int count, const int* ready, int* flag) {
  dev::block_sync();
  if (dev::thread_index() == 0) {
    flag[0] = dev::arrive(counter) == count - 1;
    if (flag[0]) {
      dev::acquire_fence();  // the other blocks' stores, before the barrier passes them on
      if (ready != nullptr) wait_released(ready);
    }
  }
  dev::block_sync();
  return flag[0];
}

// The last producer: out[i] = scale * the sum of parts[q * size + i] over the producers q, in
// order (deterministic), then `ready` released for the blocks waiting on out.
PK_DEVICE void sum_parts_and_release(const float* parts, int producers, int64_t size, float scale, float* out,
                                     int* ready) {
  const int tid = static_cast<int>(dev::thread_index());
  for (int64_t idx = tid; idx < size; idx += kThreads) {
    float v = 0.f;
    for (int q = 0; q < producers; ++q) v += dev::load_l2(&parts[q * size + idx]);
    out[idx] = v * scale;
  }
  dev::block_sync();
  if (tid == 0) {
    dev::acquire_fence();  // out's stores before the flag (a fence, then the release store)
    dev::store_release(ready, 1);
  }
}

// The 8 elements of a 16-bit row at k (a multiple of 8), zero past K or for rows out of range.
template <bool kStream>
PK_DEVICE dev::u32x4 load_row8(const void* base, int64_t row, int64_t rows, int64_t K, int64_t k) {
  if (row >= rows || k >= K) return zero16();
  const void* p = static_cast<const uint16_t*>(base) + row * K + k;
  return kStream ? dev::load_stream16(p) : dev::load_cached16(p);
}

// Zero the dropped entries of 8 elements of x at (row, k): unscaled, as reference.lora.masked.
PK_DEVICE dev::u32x4 drop8(dev::u32x4 v, uint32_t key, int64_t k, uint32_t threshold) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = mask::keep(key, static_cast<uint32_t>(k + 2 * i), threshold) ? 0x0000FFFFu : 0u;
    const uint32_t hi = mask::keep(key, static_cast<uint32_t>(k + 2 * i + 1), threshold) ? 0xFFFF0000u : 0u;
    w[i] &= lo | hi;
  }
  return dev::u32x4{w[0], w[1], w[2], w[3]};
}

// acc[mt][j] += x-tile mt (16 rows) * (8 rows of `rows_ptr` at row0 + 8 j)^T over one 32-step.
template <typename T, int MT, int NT>
PK_DEVICE void mma_step(float (&acc)[MT][NT][4], const dev::u32x4 (&xv)[MT][2], const dev::u32x4 (&wv)[NT]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint32_t a[4] = {dev::word(xv[mt][0], 2 * h), dev::word(xv[mt][1], 2 * h), dev::word(xv[mt][0], 2 * h + 1),
                             dev::word(xv[mt][1], 2 * h + 1)};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t b[2] = {dev::word(wv[j], 2 * h), dev::word(wv[j], 2 * h + 1)};
        dev::mma16816(acc[mt][j], a, b, T{});
      }
    }
  }
}

// f(row, col, value) for every accumulator element lane (g, t) holds in an [MT x NT] grid of
// m16n8 tiles (rows g, g + 8 and columns 2t, 2t + 1 of each, PTX ISA fragment layout).
template <int MT, int NT, typename F>
PK_DEVICE void for_each_acc(const float (&acc)[MT][NT][4], int g, int t, F&& f) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(mt * 16 + g + (e >= 2 ? 8 : 0), j * 8 + 2 * t + (e & 1), acc[mt][j][e]);
}

// The x fragments of one step (rows g and g + 8 of each m16 tile), dropout applied when `key`s given.
template <int MT>
PK_DEVICE void load_x(dev::u32x4 (&xv)[MT][2], const Params& p, int g, int64_t k, const uint32_t* keys) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = mt * 16 + half * 8 + g;
      xv[mt][half] = load_row8<false>(p.x, row, p.M, p.K, k);
      if (keys != nullptr && row < p.M && k < p.K) xv[mt][half] = drop8(xv[mt][half], keys[mt * 2 + half], k, p.threshold);
    }
}

// Producer block i: upart[i] = dropout(x) A^T over its range of K (unscaled); the last producer
// to arrive sums the parts in order into u (times 1 / (1 - p)) and releases the u-ready flag.
template <typename T, int MT>
PK_DEVICE void produce_u(const Params& p, int i, float* red /* [kWarps][MT * 16][16] */, int* flag) {
  const int tid = static_cast<int>(dev::thread_index()), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  int64_t lo, hi;
  split_range((p.K + kStep - 1) / kStep, p.producers, i, lo, hi);
  uint32_t keys[MT * 2];
  const bool drop = p.seed != nullptr;
  if (drop)
    for (int j = 0; j < MT * 2; ++j) keys[j] = mask::row_key(*p.seed, static_cast<uint32_t>(j / 2 * 16 + j % 2 * 8 + g));
  const int rank_tiles = static_cast<int>((p.r + 7) / 8);
  for (int rt0 = 0; rt0 < rank_tiles; rt0 += 2) {  // two n8 tiles of A (16 ranks) per pass
    float acc[MT][2][4] = {};
    for (int64_t step = lo + warp; step < hi; step += kWarps) {  // the block's warps interleave steps
      const int64_t k = step * kStep + 8 * t;
      dev::u32x4 xv[MT][2], av[2];
      load_x<MT>(xv, p, g, k, drop ? keys : nullptr);
#pragma unroll
      for (int j = 0; j < 2; ++j) av[j] = load_row8<false>(p.a, (rt0 + j) * 8 + g, p.r, p.K, k);
      mma_step<T, MT, 2>(acc, xv, av);
    }
    // warps' partial sums -> red, then summed in warp order (deterministic)
    for_each_acc(acc, g, t, [&](int row, int col, float v) { red[(warp * MT * 16 + row) * 16 + col] = v; });
    dev::block_sync();
    for (int idx = tid; idx < MT * 16 * 16; idx += kThreads) {
      const int64_t m = idx / 16, j = rt0 * 8 + idx % 16;
      if (m < p.M && j < p.r) {
        float v = 0.f;
        for (int w = 0; w < kWarps; ++w) v += red[w * MT * 16 * 16 + idx];
        p.upart[(static_cast<int64_t>(i) * p.M + m) * p.r + j] = v;
      }
    }
    dev::block_sync();
  }
  if (last_to_arrive(&p.counters[p.groups], p.producers, nullptr, flag))
    sum_parts_and_release(p.upart, p.producers, p.M * p.r, p.inv_keep, p.u, &p.counters[p.groups + 1]);
}

// The dense main loop: acc += x W^T over the 32-steps [lo, hi) for the warp's 16 rows of W at n0.
template <typename T, int MT>
PK_DEVICE void dense_steps(float (&acc)[MT][kWarpTiles][4], const Params& p, int64_t n0, int64_t lo, int64_t hi,
                           int g, int t) {
  for (int64_t s0 = lo; s0 < hi; s0 += kUnroll) {
    dev::u32x4 wv[kUnroll][kWarpTiles];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)  // every load of the group of steps is issued before any mma
#pragma unroll
      for (int j = 0; j < kWarpTiles; ++j)
        wv[u][j] = s0 + u < hi ? load_row8<true>(p.w, n0 + j * 8 + g, p.N, p.K, (s0 + u) * kStep + 8 * t) : zero16();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (s0 + u >= hi) break;
      dev::u32x4 xv[MT][2];
      load_x<MT>(xv, p, g, (s0 + u) * kStep + 8 * t, nullptr);
      mma_step<T, MT, kWarpTiles>(acc, xv, wv[u]);
    }
  }
}

// The scale of the quantization block holding flat weight index f.
PK_DEVICE float block_scale(const Params& p, int64_t f, const float* code2) {
  const int64_t b = f >> p.blocksize_log2;
  if (p.absmax2 == nullptr) return static_cast<const float*>(p.absmax)[b];
  const uint8_t q = dev::load_u8(static_cast<const uint8_t*>(p.absmax) + b);
  return dev::add_rn(dev::mul_rn(code2[q], p.absmax2[b >> 8]), *p.offset);
}

// Two decoded weights, packed as the mma operand's k pair: byte (hi nibble: the even element).
template <typename T>
PK_DEVICE uint32_t decode_pair(uint32_t byte, float scale, const float* code) {
  return dev::pack2<T>(dev::mul_rn(code[(byte >> 4) & 0xF], scale), dev::mul_rn(code[byte & 0xF], scale));
}

// The 4-bit main loop: lane (g, t) of a 128-step at k holds the 32 weights k + 32t .. k + 32t + 31
// of its rows, 16 bytes of codes. mma h (0..7) of the step takes the lane's weights 4h .. 4h + 3 as
// its k pairs (2t, 2t + 1) and (2t + 8, 2t + 9); x's fragments follow the same permutation.
template <typename T, int MT>
PK_DEVICE void quant_steps(float (&acc)[MT][kWarpTiles][4], const Params& p, int64_t n0, int64_t lo, int64_t hi,
                           int g, int t, const float* code, const float* code2) {
  for (int64_t s0 = lo; s0 < hi; s0 += kQuantUnroll) {
    dev::u32x4 qv[kQuantUnroll][kWarpTiles];
    float scale[kQuantUnroll][kWarpTiles];
#pragma unroll
    for (int u = 0; u < kQuantUnroll; ++u)
#pragma unroll
      for (int j = 0; j < kWarpTiles; ++j) {
        const int64_t row = n0 + j * 8 + g, k = (s0 + u) * kQuantStep + 32 * t;
        const bool ok = s0 + u < hi && row < p.N && k < p.K;
        const int64_t f = row * p.K + k;
        qv[u][j] = ok ? dev::load_stream16(p.packed + f / 2) : zero16();
        scale[u][j] = ok ? block_scale(p, f, code2) : 0.f;
      }
#pragma unroll
    for (int u = 0; u < kQuantUnroll; ++u) {
      if (s0 + u >= hi) break;
      const int64_t k = (s0 + u) * kQuantStep + 32 * t;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // 8 weights of each row = two mma k-steps per 16-byte x load
        dev::u32x4 xv[MT][2], wv[kWarpTiles];
        load_x<MT>(xv, p, g, k + 8 * q, nullptr);
#pragma unroll
        for (int j = 0; j < kWarpTiles; ++j) {
          const uint32_t bytes = dev::word(qv[u][j], q);  // weights k + 8q .. k + 8q + 7
          wv[j] = dev::u32x4{decode_pair<T>(bytes & 0xFF, scale[u][j], code),
                             decode_pair<T>((bytes >> 8) & 0xFF, scale[u][j], code),
                             decode_pair<T>((bytes >> 16) & 0xFF, scale[u][j], code),
                             decode_pair<T>(bytes >> 24, scale[u][j], code)};
        }
        mma_step<T, MT, kWarpTiles>(acc, xv, wv);
      }
    }
  }
}

// Main block (group, split): the partial x W^T of 64 rows of W over one range of K; the group's
// last block to arrive writes y for those rows.
template <typename T, int MT, bool kQuant>
PK_DEVICE void main_block(const Params& p, int group, int split, float* us /* [MT * 16][kMaxRank] */,
                          const float* code, const float* code2, int* flag) {
  const int tid = static_cast<int>(dev::thread_index()), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(group) * kGroupRows + warp * kWarpTiles * 8;
  int64_t lo, hi;
  split_range((p.K + (kQuant ? kQuantStep : kStep) - 1) / (kQuant ? kQuantStep : kStep), p.splits, split, lo, hi);
  float acc[MT][kWarpTiles][4] = {};
  if (kQuant) quant_steps<T, MT>(acc, p, n0, lo, hi, g, t, code, code2);
  else dense_steps<T, MT>(acc, p, n0, lo, hi, g, t);
  float* part = p.part + static_cast<int64_t>(split) * p.M * p.N;
  for_each_acc(acc, g, t, [&](int m, int col, float v) {
    if (m < p.M && n0 + col < p.N) part[m * p.N + n0 + col] = v;
  });
  // the group's last split sums the partials, once u is ready
  if (!last_to_arrive(&p.counters[group], p.splits, p.r > 0 ? &p.counters[p.groups + 1] : nullptr, flag)) return;
  for (int64_t idx = tid; idx < p.M * p.r; idx += kThreads) us[idx / p.r * kMaxRank + idx % p.r] = dev::load_l2(&p.u[idx]);
  dev::block_sync();
  const T* B = static_cast<const T*>(p.b);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t g0 = static_cast<int64_t>(group) * kGroupRows;
  for (int64_t idx = tid; idx < p.M * kGroupRows; idx += kThreads) {
    const int64_t m = idx / kGroupRows, n = g0 + idx % kGroupRows;
    if (n >= p.N) continue;
    float v = 0.f;
    for (int q = 0; q < p.splits; ++q) v += dev::load_l2(&p.part[(q * p.M + m) * p.N + n]);
    float lora = 0.f;
    for (int64_t j = 0; j < p.r; ++j) lora += us[m * kMaxRank + j] * dev::to_f(B[n * p.r + j]);
    v += p.s * lora;
    if (bias != nullptr) v += dev::to_f(bias[n]);
    static_cast<T*>(p.y)[m * p.N + n] = dev::from_f<T>(v);
  }
}

template <typename T, int MT, bool kQuant>
#ifdef __CUDACC__
__global__ void __launch_bounds__(kThreads) lora_small_m_fwd_kernel(const Params p) {
#else
void lora_small_m_fwd_kernel(const Params p) {
#endif
  // one shared buffer serves either role: producers reduce warps' sums in it, main blocks hold u
  __shared__ float smem[kWarps * kMaxTiles * 16 * 16 > kMaxTiles * 16 * kMaxRank ? kWarps * kMaxTiles * 16 * 16
                                                                                 : kMaxTiles * 16 * kMaxRank];
  // the 4-bit code and the nested scales' map: 16 entries in 16 banks, so any lookup pattern is
  // free of bank conflicts
  __shared__ float code[16], code2[256];
  __shared__ int flag[1];
  const int b = static_cast<int>(dev::block_index());
  if (b < p.producers) {
    produce_u<T, MT>(p, b, smem, flag);
    return;
  }
  if (kQuant) {
    const int tid = static_cast<int>(dev::thread_index());
    if (tid < 16) code[tid] = p.code[tid];
    if (p.absmax2 != nullptr)
      for (int i = tid; i < 256; i += kThreads) code2[i] = p.code2[i];
    dev::block_sync();
  }
  const int i = b - p.producers;
  main_block<T, MT, kQuant>(p, i / p.splits, i % p.splits, smem, code, code2, flag);
}

}  // namespace small_m
}  // namespace peft_kernels
