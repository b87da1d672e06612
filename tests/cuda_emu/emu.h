// A CPU emulator for the CUDA kernels written against csrc/device_compat.cuh: every thread of a
// block is a host thread (std::thread), blocks run one after another (so `__shared__` arrays can
// be function statics, and a block that waits only on lower-indexed blocks never deadlocks),
// __syncthreads is a barrier of the block's threads, mma.sync m16n8k16 is computed from the 32
// lanes' fragments exchanged at a barrier of the warp, with the fragment layout of the PTX ISA,
// a warp sum is __shfl_xor_sync's butterfly in the GPU's order, and fp32 atomics are std::atomic_ref.
// A lane that skips a warp-wide mma deadlocks the emulator as it would hang or corrupt the GPU.
// Test infrastructure only (tests/helpers.py emulated_cuda_library builds it with g++).
#pragma once
#define PEFT_KERNELS_CUDA_EMULATOR 1

#include <atomic>
#include <cstdlib>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __shared__ static
#define __restrict__

namespace peft_kernels_emu {

struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };
struct u32x4 { uint32_t x, y, z, w; };

inline float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float to_f(f16 v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
template <typename T> T from_f(float v);
template <> inline float from_f<float>(float v) { return v; }
template <> inline bf16 from_f<bf16>(float v) {  // round to nearest even, NaN kept quiet
  uint32_t b = float_to_bits(v);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return bf16{static_cast<uint16_t>((b >> 16) | 0x40u)};
  b += 0x7FFFu + ((b >> 16) & 1u);
  return bf16{static_cast<uint16_t>(b >> 16)};
}
template <> inline f16 from_f<f16>(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  f16 out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}

template <typename T> inline uint32_t pack2(float a, float b) {
  return static_cast<uint32_t>(from_f<T>(a).bits) | (static_cast<uint32_t>(from_f<T>(b).bits) << 16);
}

struct Warp {
  std::barrier<> bar{32};
  uint32_t a[32][4], b[32][2];
  float f[32];
};
struct Block {
  explicit Block(int threads) : bar(threads), warps(threads / 32) {}
  std::barrier<> bar;
  std::vector<Warp> warps;
};
inline thread_local unsigned t_thread = 0, t_block = 0, t_block_y = 0, t_block_z = 0;
inline thread_local Block* t_ctx = nullptr;

inline unsigned thread_index() { return t_thread; }
inline unsigned block_index() { return t_block; }
inline unsigned block_index_y() { return t_block_y; }
inline unsigned block_index_z() { return t_block_z; }
inline void block_sync() { t_ctx->bar.arrive_and_wait(); }

// __shfl_xor_sync's butterfly: at each step o = 16, 8, ..., 1 every lane adds lane ^ o's value to
// its own, in the GPU's order. One exchange of the 32 values, then each lane replays the butterfly
// (a barrier per step cost most of the emulator's time in block reductions).
inline float warp_sum(float v) {
  Warp& w = t_ctx->warps[t_thread / 32];
  const unsigned lane = t_thread % 32;
  w.f[lane] = v;
  w.bar.arrive_and_wait();
  float vals[32];
  std::memcpy(vals, w.f, sizeof(vals));
  w.bar.arrive_and_wait();  // nobody stages the next values before every lane has read these
  for (unsigned o = 16; o > 0; o >>= 1) {
    float next[32];
    for (unsigned l = 0; l < 32; ++l) next[l] = vals[l] + vals[l ^ o];
    std::memcpy(vals, next, sizeof(vals));
  }
  return vals[lane];
}
inline void atomic_add(float* p, float v) { std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed); }

inline u32x4 load16(const void* p) { u32x4 v; std::memcpy(&v, p, 16); return v; }
inline u32x4 load_stream16(const void* p) { return load16(p); }
inline u32x4 load_cached16(const void* p) { return load16(p); }
inline float load_l2(const float* p) { return std::atomic_ref<const float>(*p).load(std::memory_order_relaxed); }

template <typename T> float half_of(uint32_t word, int hi) {
  T v{static_cast<uint16_t>(hi ? word >> 16 : word & 0xFFFFu)};
  return to_f(v);
}

// d [16 x 8] += a [16 x 16] * b [16 x 8]; lane = 4 g + t holds a (rows g, g + 8; columns 2t, 2t + 1,
// 2t + 8, 2t + 9: registers {g, 2t}, {g + 8, 2t}, {g, 2t + 8}, {g + 8, 2t + 8}), b (k rows 2t, 2t + 1
// and 2t + 8, 2t + 9 of column g) and d (rows g, g + 8, columns 2t, 2t + 1).
template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], T) {
  Warp& w = t_ctx->warps[t_thread / 32];
  const int lane = static_cast<int>(t_thread % 32), g = lane / 4, t = lane % 4;
  std::memcpy(w.a[lane], a, sizeof(a));
  std::memcpy(w.b[lane], b, sizeof(b));
  w.bar.arrive_and_wait();
  auto A = [&](int row, int col) {
    return half_of<T>(w.a[(row % 8) * 4 + (col % 8) / 2][(row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0)], col % 2);
  };
  auto B = [&](int k, int col) { return half_of<T>(w.b[col * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k % 2); };
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    d[e] += s;
  }
  w.bar.arrive_and_wait();  // nobody stages the next operands before every lane has read these
}

inline int arrive(int* counter) { return std::atomic_ref<int>(*counter).fetch_add(1, std::memory_order_acq_rel); }
inline void acquire_fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int load_acquire(const int* p) { return std::atomic_ref<const int>(*p).load(std::memory_order_acquire); }
inline void store_release(int* p, int v) { std::atomic_ref<int>(*p).store(v, std::memory_order_release); }
inline void backoff() { std::this_thread::yield(); }
[[noreturn]] inline void fail() { std::abort(); }
inline float mul_rn(float a, float b) { volatile float r = a * b; return r; }  // no FMA contraction
inline float add_rn(float a, float b) { volatile float r = a + b; return r; }
inline uint8_t load_u8(const uint8_t* p) { return *p; }

// kernel() for every thread of a (gx, gy, gz) grid of blocks of `threads` threads, block after
// block (x fastest). One host thread per CUDA thread for the whole launch (spawning them per block
// cost most of the emulator's time): each runs its part of every block in turn, and the next block
// starts only when every thread has left the last one (so `__shared__` statics are never shared
// between two live blocks).
inline void launch(unsigned gx, unsigned gy, unsigned gz, int threads, const std::function<void()>& kernel) {
  Block ctx(threads);
  std::barrier<> next_block(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([&, i] {
      t_thread = static_cast<unsigned>(i);
      t_ctx = &ctx;
      for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
          for (unsigned x = 0; x < gx; ++x) {
            t_block = x;
            t_block_y = y;
            t_block_z = z;
            kernel();
            next_block.arrive_and_wait();
          }
    });
  for (auto& th : pool) th.join();
}
inline void launch(int blocks, int threads, const std::function<void()>& kernel) {
  launch(static_cast<unsigned>(blocks), 1, 1, threads, kernel);
}

}  // namespace peft_kernels_emu
