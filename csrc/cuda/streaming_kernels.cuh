// Streaming Sinkhorn attention on a GPU: no Nq x Nk matrix (docs/method.md sections 1 and 4).
//
// The logits are recomputed tile by tile in every sweep, the adversarial cost applied to each
// tile of q k^T as it is made (norms computed once):
//   - stream_rows_kernel: one block per 32 query rows sweeps all key tiles: the row step
//     f_i = -LSE_j(M_ij + g_j) with an online log-sum-exp; in the last sweep a second pass
//     multiplies the plan exp(M + g + f) by v, 64 output columns at a time;
//   - stream_columns_kernel: one block per 32 keys sweeps all query tiles: the column step
//     g_j = log(Nq / Nk) - LSE_i(M_ij + f_i), exactly, in the log domain.
// A tile of q k^T is a product of tensor-core fragments (WMMA, float32 accumulation: exact
// products) for float16/bfloat16 inputs, and plain float32 (float64) arithmetic otherwise.
// Memory: f, g and the norms, O(Nq + Nk) per slice; deterministic (no atomics).
//
// Compiled by nvcc (sinkhorn_cuda.cu) and, through csrc/emulation/cuda_shim.h, by the host
// compiler for CI, WMMA included (the shim emulates its documented semantics).
#pragma once

#include <cstdint>
#include <type_traits>

#include "sinkhorn_kernels.cuh"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace asag {
namespace cuda {

constexpr int kStreamThreads = 128;
constexpr int kTileM = 32;  // tile rows: queries in the row sweep, keys in the column sweep
constexpr int kTileN = 64;  // tile columns
constexpr int kLanes = kStreamThreads / kTileM;  // threads sharing a tile row (neighbours in a warp)
constexpr int kLaneCols = kTileN / kLanes;       // tile columns per thread

// The product's depth per step and the output columns per pass of the last sweep: smaller in
// float64, so that a block's static shared memory stays under 48 KB.
template <typename T>
struct Tiles {
  static constexpr int kD = sizeof(T) == 8 ? 16 : 32;
  static constexpr int kV = sizeof(T) == 8 ? 32 : 64;
  static constexpr int kLaneOut = kV / kLanes;
};

// The tensor-core type of an input type, or void (no tensor cores: float and double).
template <typename In> struct MmaType { using type = void; };
#ifdef __CUDACC__
template <> struct MmaType<c10::Half> { using type = __half; };
template <> struct MmaType<c10::BFloat16> { using type = __nv_bfloat16; };
#else
template <> struct MmaType<c10::Half> { using type = c10::Half; };
template <> struct MmaType<c10::BFloat16> { using type = c10::BFloat16; };
#endif

// Stages rows [0, rows) of X (row-major, depth d) at depth [k0, k0 + kD) into Xs (n x kD),
// zero past the rows and the depth.
template <typename In, int kD>
__device__ __forceinline__ void stage(const In* __restrict__ X, int64_t rows, int64_t d, int64_t k0, int n,
                                      In* Xs) {
  for (int e = threadIdx.x; e < n * kD; e += kStreamThreads) {
    const int64_t row = e / kD, col = k0 + e % kD;
    Xs[e] = row < rows && col < d ? X[row * d + col] : In(0.f);
  }
}

// out (kTileM x kTileN, row-major) = A_tile B_tile^T: rows [0, a_rows) of A and [0, b_rows) of
// B (both row-major, depth d, rows past those count as zero). As / Bs: kTileM (kTileN) x kD
// staging in shared memory. Ends with a barrier: out is ready for every thread.
template <typename In, typename T, int kD>
__device__ __forceinline__ void tile_product(const In* __restrict__ A, int64_t a_rows,
                                             const In* __restrict__ B, int64_t b_rows, int64_t d,
                                             In* As, In* Bs, T* out) {
  using Mma = typename MmaType<In>::type;
  if constexpr (!std::is_same<Mma, void>::value) {
    // Tensor cores: warp w owns the 16-row strip w / 2 and 32 columns at 32 * (w % 2).
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x >> 5, strip = warp / 2, cols = 32 * (warp % 2);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c0, c1;
    wmma::fill_fragment(c0, 0.f);
    wmma::fill_fragment(c1, 0.f);
    for (int64_t k0 = 0; k0 < d; k0 += kD) {
      stage<In, kD>(A, a_rows, d, k0, kTileM, As);
      stage<In, kD>(B, b_rows, d, k0, kTileN, Bs);
      __syncthreads();
      const Mma* as = reinterpret_cast<const Mma*>(As);
      const Mma* bs = reinterpret_cast<const Mma*>(Bs);
      for (int kk = 0; kk < kD; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, Mma, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Mma, wmma::col_major> b0, b1;
        wmma::load_matrix_sync(a, as + strip * 16 * kD + kk, kD);
        wmma::load_matrix_sync(b0, bs + cols * kD + kk, kD);  // B^T, column-major: B's rows
        wmma::load_matrix_sync(b1, bs + (cols + 16) * kD + kk, kD);
        wmma::mma_sync(c0, a, b0, c0);
        wmma::mma_sync(c1, a, b1, c1);
      }
      __syncthreads();  // the staging buffers are refilled next step
    }
    wmma::store_matrix_sync(out + strip * 16 * kTileN + cols, c0, kTileN, wmma::mem_row_major);
    wmma::store_matrix_sync(out + strip * 16 * kTileN + cols + 16, c1, kTileN, wmma::mem_row_major);
  } else {
    const int r = threadIdx.x / kLanes, cbase = (threadIdx.x % kLanes) * kLaneCols;
    T acc[kLaneCols];
    for (int c = 0; c < kLaneCols; ++c) acc[c] = T(0);
    for (int64_t k0 = 0; k0 < d; k0 += kD) {
      stage<In, kD>(A, a_rows, d, k0, kTileM, As);
      stage<In, kD>(B, b_rows, d, k0, kTileN, Bs);
      __syncthreads();
      for (int kk = 0; kk < kD; ++kk) {
        const T x = static_cast<T>(As[r * kD + kk]);
        for (int c = 0; c < kLaneCols; ++c) acc[c] += x * static_cast<T>(Bs[(cbase + c) * kD + kk]);
      }
      __syncthreads();
    }
    for (int c = 0; c < kLaneCols; ++c) out[r * kTileN + cbase + c] = acc[c];
  }
  __syncthreads();
}

// Merges the (max, sum) pairs of the kLanes threads of a tile row (neighbouring lanes).
template <typename T>
__device__ __forceinline__ void merge_lanes(T& run_max, T& run_sum) {
  for (int offset = 1; offset < kLanes; offset <<= 1) {
    const T other_max = __shfl_xor_sync(0xffffffffu, run_max, offset);
    const T other_sum = __shfl_xor_sync(0xffffffffu, run_sum, offset);
    const T m = other_max > run_max ? other_max : run_max;
    if (m == neg_inf<T>()) continue;
    run_sum = run_sum * math::exp_nonpositive(run_max - m) + other_sum * math::exp_nonpositive(other_max - m);
    run_max = m;
  }
}

// Everything that turns a product q_i . k_j of slice s into the logit M_ij.
template <typename T>
struct LogitRule {
  const T* rq;  // this slice's inverse query norms
  const T* rk;  // this slice's inverse key norms
  const T* bias;  // at this slice's (b, h), or null
  int64_t bias_si, bias_sj;
  const bool* valid;  // this slice's key mask, or null
  T scale, lam, inv_tau;

  __device__ __forceinline__ T operator()(T dot, int64_t i, int64_t j) const {
    T x = math::adversarial_logit(dot, rq[i], rk[j], scale, lam, inv_tau);
    if (bias != nullptr) x = math::clamp_logit(x + bias[i * bias_si + j * bias_sj]);
    if (valid != nullptr && !valid[j]) x = neg_inf<T>();
    return x;
  }
};

template <typename T>
__device__ __forceinline__ LogitRule<T> logit_rule(const T* rq, const T* rk, int64_t s, int64_t nq, int64_t nk,
                                                    int64_t heads, const BiasView<T>& bias, const bool* valid,
                                                    T scale, T lam, T inv_tau) {
  LogitRule<T> rule;
  rule.rq = rq + s * nq;
  rule.rk = rk + s * nk;
  rule.bias = bias.ptr != nullptr ? bias.ptr + (s / heads) * bias.sb + (s % heads) * bias.sh : nullptr;
  rule.bias_si = bias.si;
  rule.bias_sj = bias.sj;
  rule.valid = valid != nullptr ? valid + s * nk : nullptr;
  rule.scale = scale;
  rule.lam = lam;
  rule.inv_tau = inv_tau;
  return rule;
}

// Row sweep over all keys for the 32 query rows of block blockIdx.x of chunk slice blockIdx.y:
// f_i = -LSE_j(M_ij + g_j) (0 for a row with no reachable key). With `write_out`, then
// out_i = sum_j exp(M_ij + g_j + f_i) v_j, in passes of 64 output columns.
template <typename In, typename T>
__global__ void stream_rows_kernel(const In* __restrict__ q, const In* __restrict__ k,
                                   const T* __restrict__ v, const T* __restrict__ rq,
                                   const T* __restrict__ rk, const T* __restrict__ g,
                                   T* __restrict__ f, T* __restrict__ out, int64_t nq, int64_t nk,
                                   int64_t d, int64_t dv, int64_t slice0, int64_t heads, T scale,
                                   T lam, T inv_tau, BiasView<T> bias, const bool* __restrict__ valid,
                                   bool write_out) {
  constexpr int kD = Tiles<T>::kD, kV = Tiles<T>::kV, kLaneOut = Tiles<T>::kLaneOut;
  __shared__ In As[kTileM * kD];
  __shared__ In Bs[kTileN * kD];
  __shared__ T tile[kTileM * kTileN];
  __shared__ T Vs[kTileN * kV];
  const int64_t s = slice0 + blockIdx.y, row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int tid = threadIdx.x, r = tid / kLanes, cbase = (tid % kLanes) * kLaneCols;
  const int64_t i = row0 + r;
  const In* qs = q + s * nq * d + row0 * d;
  const In* ks = k + s * nk * d;
  const T* gs = g + s * nk;
  const LogitRule<T> logit = logit_rule(rq, rk, s, nq, nk, heads, bias, valid, scale, lam, inv_tau);

  T run_max = neg_inf<T>(), run_sum = T(0);
  for (int64_t n0 = 0; n0 < nk; n0 += kTileN) {
    tile_product<In, T, kD>(qs, nq - row0, ks + n0 * d, nk - n0, d, As, Bs, tile);
    for (int c = 0; c < kLaneCols; ++c) {
      const int64_t j = n0 + cbase + c;
      if (i < nq && j < nk) math::lse_accumulate(run_max, run_sum, logit(tile[r * kTileN + cbase + c], i, j) + gs[j]);
    }
    __syncthreads();  // the tile is overwritten next
  }
  merge_lanes(run_max, run_sum);
  const bool empty = run_max == neg_inf<T>();
  if (i < nq && tid % kLanes == 0) f[s * nq + i] = empty ? T(0) : math::row_potential(run_max, run_sum);
  if (!write_out) return;  // uniform across the block

  const T inv_sum = empty ? T(0) : T(1) / run_sum;
  const int obase = (tid % kLanes) * kLaneOut;
  for (int64_t c0 = 0; c0 < dv; c0 += kV) {
    T acc[kLaneOut];
    for (int c = 0; c < kLaneOut; ++c) acc[c] = T(0);
    for (int64_t n0 = 0; n0 < nk; n0 += kTileN) {
      tile_product<In, T, kD>(qs, nq - row0, ks + n0 * d, nk - n0, d, As, Bs, tile);
      for (int c = 0; c < kLaneCols; ++c) {  // the tile becomes this row block's plan
        const int64_t j = n0 + cbase + c;
        T p = T(0);
        if (i < nq && j < nk && !empty) p = math::exp_nonpositive(logit(tile[r * kTileN + cbase + c], i, j) + gs[j] - run_max) * inv_sum;
        tile[r * kTileN + cbase + c] = p;
      }
      for (int e = tid; e < kTileN * kV; e += kStreamThreads) {
        const int64_t j = n0 + e / kV, col = c0 + e % kV;
        Vs[e] = j < nk && col < dv ? v[(s * nk + j) * dv + col] : T(0);
      }
      __syncthreads();
      for (int jj = 0; jj < kTileN; ++jj) {
        const T p = tile[r * kTileN + jj];
        for (int c = 0; c < kLaneOut; ++c) acc[c] += p * Vs[jj * kV + obase + c];
      }
      __syncthreads();
    }
    for (int c = 0; c < kLaneOut; ++c) {
      if (i < nq && c0 + obase + c < dv) out[(s * nq + i) * dv + c0 + obase + c] = acc[c];
    }
  }
}

// Column sweep over all queries for the 32 keys of block blockIdx.x of chunk slice blockIdx.y:
// g_j = log(Nq / Nk) - LSE_i(M_ij + f_i), exactly; masked keys and keys no query reaches keep g.
template <typename In, typename T>
__global__ void stream_columns_kernel(const In* __restrict__ q, const In* __restrict__ k,
                                      const T* __restrict__ rq, const T* __restrict__ rk,
                                      const T* __restrict__ f, T* __restrict__ g, int64_t nq,
                                      int64_t nk, int64_t d, int64_t slice0, int64_t heads, T scale,
                                      T lam, T inv_tau, BiasView<T> bias, const bool* __restrict__ valid,
                                      const T* __restrict__ log_marginal) {
  constexpr int kD = Tiles<T>::kD;
  __shared__ In As[kTileM * kD];
  __shared__ In Bs[kTileN * kD];
  __shared__ T tile[kTileM * kTileN];
  const int64_t s = slice0 + blockIdx.y, col0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int tid = threadIdx.x, c = tid / kLanes, qbase = (tid % kLanes) * kLaneCols;
  const int64_t j = col0 + c;
  const In* ks = k + s * nk * d + col0 * d;
  const In* qs = q + s * nq * d;
  const T* fs = f + s * nq;
  const LogitRule<T> logit = logit_rule(rq, rk, s, nq, nk, heads, bias, valid, scale, lam, inv_tau);

  T run_max = neg_inf<T>(), run_sum = T(0);
  for (int64_t m0 = 0; m0 < nq; m0 += kTileN) {
    tile_product<In, T, kD>(ks, nk - col0, qs + m0 * d, nq - m0, d, As, Bs, tile);  // tile[key][query]
    for (int e = 0; e < kLaneCols; ++e) {
      const int64_t i = m0 + qbase + e;
      if (j < nk && i < nq) math::lse_accumulate(run_max, run_sum, logit(tile[c * kTileN + qbase + e], i, j) + fs[i]);
    }
    __syncthreads();
  }
  merge_lanes(run_max, run_sum);
  if (j < nk && tid % kLanes == 0 && (valid == nullptr || valid[s * nk + j])) {
    T gj = g[s * nk + j];
    math::exact_column_update(gj, run_max, run_sum, log_marginal[s]);
    g[s * nk + j] = gj;
  }
}

}  // namespace cuda
}  // namespace asag
