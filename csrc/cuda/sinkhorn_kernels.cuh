// The CUDA kernels of the asag ops: adversarial-cost epilogue and batched log-domain Sinkhorn
// scaling (docs/method.md sections 1 and 4). The per-element maths comes from
// asag/sinkhorn_math.h, the header the CPU kernels use.
//
// This file is compiled twice from the same text: by nvcc for the GPU (sinkhorn_cuda.cu), and
// by the host compiler for CI, through csrc/emulation/cuda_shim.h, which runs every CUDA thread
// of a block as an OS thread (see that file). Only what the shim maps may appear here:
// threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __shfl_xor_sync, static __shared__
// arrays and ASAG_DYNAMIC_SHARED.
//
//   - row_step_kernel: one block per 32 rows. For each row: max of M + g, then
//     e = exp(M + g - max) and its sum, giving f; the same e / s are summed per column into a
//     per-block partial (or written as the plan on the last step). One read of the logits
//     per iteration, one exponential per logit when the row fits in shared memory.
//   - column_step_kernel: one thread per column sums the partials (deterministic: no atomics)
//     and updates g; a column whose mass underflowed is flagged, and
//   - exact_column_kernel recomputes each flagged column in the log domain, one block per
//     column, its rows spread over the block's threads.
#pragma once

#include <cstdint>

#include "asag/op_common.h"
#include "asag/sinkhorn_math.h"

#ifndef ASAG_DYNAMIC_SHARED  // nvcc; the emulation defines its own
#define ASAG_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace asag {
namespace cuda {

using math::neg_inf;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 32;

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T y = __shfl_xor_sync(0xffffffffu, x, offset);
    x = y > x ? y : x;
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Block-wide max or sum; every thread gets the result. `scratch` holds kWarps values.
template <bool kMax, typename T>
__device__ __forceinline__ T block_reduce(T x, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // the previous reduction may still be reading scratch
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  const T identity = kMax ? neg_inf<T>() : T(0);
  const T y = lane < kWarps ? scratch[lane] : identity;
  return kMax ? warp_max(y) : warp_sum(y);
}

// Block-wide log-sum-exp of per-thread (max, sum of exp(. - max)) pairs; every thread gets
// the block's pair. `scratch` holds 2 * kWarps values.
template <typename T>
__device__ __forceinline__ void block_lse(T& run_max, T& run_sum, T* scratch) {
  const T m = block_reduce<true>(run_max, scratch);
  const T s = m == neg_inf<T>() ? T(0) : run_sum * math::exp_nonpositive(run_max - m);
  run_sum = block_reduce<false>(s, scratch + kWarps);
  run_max = m;
}

// r[row] = 1 / max(|x_row|, 1e-6) for x (rows, d) read as In, summed in T: one warp per
// row, the block's warps striding over the rows.
template <typename In, typename T>
__global__ void inverse_norms_kernel(const In* __restrict__ x, int64_t rows, int64_t d,
                                     T* __restrict__ r) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows;
       row += stride) {  // uniform within the warp
    T ss = 0;
    for (int64_t c = lane; c < d; c += 32) {
      const T v = static_cast<T>(x[row * d + c]);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) r[row] = math::inverse_norm(ss);
  }
}

// L (chunk of slices, Nq x Nk) holds q k^T; replaces it by the adversarial logits plus bias,
// with -inf for masked keys. Block row blockIdx.y is chunk slice sl, global slice slice0 + sl.
// Index is the type of element indices within one slice: 32 bits whenever Nq * Nk fits.
template <typename T, typename Index>
__global__ void logits_epilogue_kernel(T* __restrict__ L, int64_t slice0, int64_t heads,
                                       Index nq, Index nk, const T* __restrict__ rq,
                                       const T* __restrict__ rk, T scale, T lam, T inv_tau,
                                       BiasView<T> bias, const bool* __restrict__ valid) {
  const int64_t sl = blockIdx.y, s = slice0 + sl;
  const Index total = nq * nk;
  T* Ls = L + sl * static_cast<int64_t>(total);
  const T* rqs = rq + s * nq;
  const T* rks = rk + s * nk;
  const bool* vs = valid != nullptr ? valid + s * nk : nullptr;
  const T* bs = bias.ptr != nullptr ? bias.ptr + (s / heads) * bias.sb + (s % heads) * bias.sh : nullptr;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index idx = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const Index i = idx / nk, j = idx - i * nk;
    T x = math::adversarial_logit(Ls[idx], rqs[i], rks[j], scale, lam, inv_tau);
    if (bs != nullptr) x = math::clamp_logit(x + bs[i * bias.si + j * bias.sj]);
    if (vs != nullptr && !vs[j]) x = neg_inf<T>();
    Ls[idx] = x;
  }
}

// Row steps on rows [blockIdx.x * kRowsPerBlock, ...) of chunk slice blockIdx.y:
// f_i = -LSE_j(L_ij + g_j). With `accumulate`, the block's sums over its rows of
// P_ij = exp(L_ij + g_j + f_i) go to colpart[slice][blockIdx.x][j]; with `write_plan`, P
// replaces L. Each thread owns the columns j = threadIdx.x (mod kThreads), so the column
// partials and the cached row need no synchronisation.
template <typename T>
__global__ void row_step_kernel(T* __restrict__ L, const T* __restrict__ g, T* __restrict__ f,
                                T* __restrict__ colpart, int64_t nq, int64_t nk,
                                bool accumulate, bool write_plan, bool col_in_smem,
                                bool cache_row) {
  ASAG_DYNAMIC_SHARED(unsigned char, smem_bytes);
  T* smem = reinterpret_cast<T*>(smem_bytes);
  __shared__ T scratch[kWarps];
  const int64_t sl = blockIdx.y;
  T* Ls = L + sl * nq * nk;
  const T* gs = g + sl * nk;
  T* fs = f + sl * nq;
  T* part = accumulate ? colpart + (sl * gridDim.x + blockIdx.x) * nk : nullptr;
  T* col = col_in_smem ? smem : part;
  T* cache = cache_row ? smem + (col_in_smem ? nk : 0) : nullptr;
  const int tid = threadIdx.x;

  if (accumulate) {
    for (int64_t j = tid; j < nk; j += kThreads) col[j] = T(0);
  }
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  for (int r = 0; r < kRowsPerBlock; ++r) {
    const int64_t i = row0 + r;
    if (i >= nq) break;  // uniform across the block
    T* row = Ls + i * nk;
    T m = neg_inf<T>();
    for (int64_t j = tid; j < nk; j += kThreads) {
      const T t = row[j] + gs[j];
      if (cache) cache[j] = t;
      m = t > m ? t : m;
    }
    m = block_reduce<true>(m, scratch);
    if (m == neg_inf<T>()) {  // no reachable key: P = 0, f = 0
      if (tid == 0) fs[i] = T(0);
      if (write_plan) {
        for (int64_t j = tid; j < nk; j += kThreads) row[j] = T(0);
      }
      continue;
    }
    T s = 0;
    for (int64_t j = tid; j < nk; j += kThreads) {
      const T e = math::exp_nonpositive((cache ? cache[j] : row[j] + gs[j]) - m);
      if (cache) cache[j] = e;
      s += e;
    }
    s = block_reduce<false>(s, scratch);
    if (tid == 0) fs[i] = math::row_potential(m, s);
    const T inv_s = T(1) / s;  // s >= 1: the max term is exp(0)
    for (int64_t j = tid; j < nk; j += kThreads) {
      const T p = (cache ? cache[j] : math::exp_nonpositive(row[j] + gs[j] - m)) * inv_s;
      if (accumulate) col[j] += p;
      if (write_plan) row[j] = p;
    }
  }
  if (accumulate && col_in_smem) {
    for (int64_t j = tid; j < nk; j += kThreads) part[j] = col[j];
  }
}

// Column step for every valid column of every chunk slice: one thread per column, the
// threads striding over the columns. c_j = sum of the row blocks' partials (deterministic: no
// atomics); g_j += log(Nq/Nk) - log(c_j). A column whose c_j underflowed keeps g_j and is
// flagged for exact_column_kernel.
template <typename T>
__global__ void column_step_kernel(T* __restrict__ g, const T* __restrict__ colpart,
                                   int64_t nparts, int64_t nk, int64_t slice0,
                                   const bool* __restrict__ valid,
                                   const T* __restrict__ log_marginal, int* __restrict__ flags) {
  const int64_t sl = blockIdx.y, s = slice0 + sl;
  const T* parts = colpart + sl * nparts * nk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nk; j += stride) {
    int flagged = 0;
    if (valid == nullptr || valid[s * nk + j]) {
      T c = 0;
      for (int64_t p = 0; p < nparts; ++p) c += parts[p * nk + j];
      T gj = g[sl * nk + j];
      if (math::column_update(gj, c, log_marginal[s])) {
        g[sl * nk + j] = gj;
      } else {
        flagged = 1;
      }
    }
    flags[sl * nk + j] = flagged;
  }
}

// Exact column steps for the flagged columns: g_j = log(Nq/Nk) - LSE_i(L_ij + f_i), one block
// per column at a time (blocks stride over the columns), the rows spread over its threads.
template <typename T>
__global__ void exact_column_kernel(const T* __restrict__ L, const T* __restrict__ f,
                                    T* __restrict__ g, const int* __restrict__ flags, int64_t nq,
                                    int64_t nk, int64_t slice0, const T* __restrict__ log_marginal) {
  __shared__ T scratch[2 * kWarps];
  const int64_t sl = blockIdx.y;
  const T* Ls = L + sl * nq * nk;
  const T* fs = f + sl * nq;
  for (int64_t j = blockIdx.x; j < nk; j += gridDim.x) {
    if (!flags[sl * nk + j]) continue;  // uniform across the block
    T run_max = neg_inf<T>(), run_sum = T(0);
    for (int64_t i = threadIdx.x; i < nq; i += kThreads) {
      math::lse_accumulate(run_max, run_sum, Ls[i * nk + j] + fs[i]);
    }
    block_lse(run_max, run_sum, scratch);
    if (threadIdx.x == 0) {
      T gj = g[sl * nk + j];
      math::exact_column_update(gj, run_max, run_sum, log_marginal[slice0 + sl]);
      g[sl * nk + j] = gj;
    }
  }
}

}  // namespace cuda
}  // namespace asag
