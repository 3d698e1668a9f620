// A CPU emulation of the CUDA features asag's kernels use, so that the kernels' own source
// (csrc/cuda/sinkhorn_kernels.cuh) runs in CI, where no GPU ever is.
//
// - Every CUDA thread of a block is an OS thread; the blocks of a launch run one after another
//   (so a block's `__shared__` arrays can be ordinary function statics).
// - __syncthreads is a real barrier of the block's threads; __shfl_xor_sync a real exchange
//   between the 32 threads of a warp, with a barrier on either side. A thread that returns
//   from the kernel leaves the block's and its warp's barriers, as on a GPU.
// - Dynamic shared memory is a buffer filled with NaN before every block; the launcher's user
//   fills work buffers with NaN before each launch. Reading what was never written shows.
// - A launch checks what a GPU would refuse: a block of more than 1024 threads or not a whole
//   number of warps, a grid y or z above 65535, dynamic shared memory above the opt-in.
//
// - WMMA fragments (tensor cores) hold their whole 16 x 16 tile in every lane (below).
//
// What it cannot show: timing and occupancy, register pressure, memory coalescing, the
// memory model beyond barrier-ordered accesses (threads here also see each other's writes
// without a barrier sooner than a GPU would promise), independent thread scheduling within
// a warp, stale values in static __shared__ arrays (they are not re-poisoned per block), a
// kernel that would depend on how a real fragment spreads its elements over the lanes, and
// the tensor cores' own order of summation.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace asag_emu {

// A barrier of the threads of a block or a warp (std::barrier: futex-based); `drop` takes a
// thread out for the rest of the block (it returned), `reset` starts the next block.
class Barrier {
 public:
  void reset(int expected) { barrier_.emplace(expected); }
  void wait() { barrier_->arrive_and_wait(); }
  void drop() { barrier_->arrive_and_drop(); }

 private:
  std::optional<std::barrier<>> barrier_;
};

struct Warp {
  uint64_t slots[32];
  Barrier barrier;
};

struct Launch {
  dim3 grid, block;
  std::vector<unsigned char> shared;
  Barrier block_barrier, start, end;
  std::vector<Warp> warps;
};

inline thread_local Launch* current = nullptr;
inline thread_local dim3 thread_index, block_index;

// The largest dynamic shared memory a block may use, as the device's opt-in limit.
inline size_t& shared_memory_limit() {
  static size_t limit = 227 * 1024;
  return limit;
}

inline unsigned char* dynamic_shared() { return current->shared.data(); }

inline void syncthreads() { current->block_barrier.wait(); }

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  if (mask != 0xffffffffu) throw std::logic_error("emulated __shfl_xor_sync supports the full warp mask only");
  Warp& warp = current->warps[thread_index.x >> 5];
  const unsigned lane = thread_index.x & 31;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slots[lane] = bits;
  warp.barrier.wait();
  const uint64_t other = warp.slots[(lane ^ static_cast<unsigned>(lane_mask)) & 31];
  warp.barrier.wait();
  T result;
  std::memcpy(&result, &other, sizeof(T));
  return result;
}

// Runs kernel<<<grid, block, shared_bytes>>>(args...) on the CPU; returns when it is done.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes, A... args) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024 || block.x % 32 != 0)
    throw std::invalid_argument("emulated launch: blocks must be 1-D whole warps of at most 1024 threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("emulated launch: invalid grid " + std::to_string(grid.x) + "x" +
                                std::to_string(grid.y) + "x" + std::to_string(grid.z));
  if (shared_bytes > shared_memory_limit())
    throw std::invalid_argument("emulated launch: " + std::to_string(shared_bytes) +
                                " bytes of dynamic shared memory exceed the device's " +
                                std::to_string(shared_memory_limit()));
  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.shared.resize(shared_bytes + 16);
  launch.warps = std::vector<Warp>(block.x / 32);
  launch.start.reset(static_cast<int>(block.x));
  launch.end.reset(static_cast<int>(block.x));
  auto run = [&](unsigned tid) {
    current = &launch;
    thread_index = dim3(tid);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          if (tid == 0) {  // no thread is inside a block now: set up the next one
            std::memset(launch.shared.data(), 0xff, launch.shared.size());  // NaN for floats
            launch.block_barrier.reset(static_cast<int>(block.x));
            for (Warp& w : launch.warps) w.barrier.reset(32);
          }
          launch.start.wait();
          block_index = dim3(x, y, z);
          kernel(static_cast<P>(args)...);
          launch.block_barrier.drop();
          launch.warps[tid >> 5].barrier.drop();
          launch.end.wait();
        }
    current = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned tid = 0; tid < block.x; ++tid) threads.emplace_back(run, tid);
  for (auto& t : threads) t.join();
}

}  // namespace asag_emu

// WMMA, the warp-level matrix operations of the tensor cores, with their documented semantics:
// a fragment is a 16 x 16 tile, loaded from and stored to memory in the given layout, and
// mma_sync computes D = A B + C with float32 accumulation. How a real fragment spreads its
// elements over the 32 lanes is unspecified; here every lane holds the whole tile, so kernels
// may only use fragments through these functions (as asag's do). Half-precision products are
// exact in float32, as on the hardware; only the order of the float32 sums may differ.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has 16 x 16 x 16 fragments");
  float x[256];
};

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& frag, const T* ptr, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      frag.x[r * 16 + c] = static_cast<float>(
          std::is_same<Layout, row_major>::value ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& frag, float value) {
  for (float& x : frag.x) x = value;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float result[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) acc += a.x[m * 16 + k] * b.x[k * 16 + n];
      result[m * 16 + n] = acc;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = result[e];
}

// Every lane holds the same tile: the first lane of the warp writes it.
inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& frag, unsigned ldm,
                              layout_t layout) {
  if ((::asag_emu::thread_index.x & 31) != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      ptr[layout == mem_row_major ? r * ldm + c : c * ldm + r] = frag.x[r * 16 + c];
}

}  // namespace wmma
}  // namespace nvcuda

// The CUDA spellings the kernels use.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define threadIdx (::asag_emu::thread_index)
#define blockIdx (::asag_emu::block_index)
#define blockDim (::asag_emu::current->block)
#define gridDim (::asag_emu::current->grid)
#define __syncthreads() ::asag_emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) ::asag_emu::shfl_xor(mask, value, lane_mask)
#define ASAG_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::asag_emu::dynamic_shared())
