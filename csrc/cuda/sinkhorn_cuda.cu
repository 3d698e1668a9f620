// CUDA kernels of the asag ops: adversarial-cost epilogue and batched log-domain Sinkhorn
// scaling (docs/method.md sections 1 and 4). The per-element maths comes from
// asag/sinkhorn_math.h, the same header the CPU kernels use.
//
// Layout: slices (b, h) are processed in chunks sized from free memory; each chunk holds one
// fp32 Nq x Nk logits buffer per slice. q k^T and P v are cuBLAS products through ATen (in
// full fp32, whatever allow_tf32 says); the epilogue and the scaling are ours:
//   - row_step_kernel: one block per 32 rows. For each row: max of M + g, then
//     e = exp(M + g - max) and its sum, giving f; the same e / s are summed per column into a
//     per-block partial (or written as the plan on the last step). One read of the logits
//     per iteration, one exponential per logit when the row fits in shared memory.
//   - column_step_kernel: one thread per column sums the partials (deterministic: no atomics)
//     and updates g; a column whose mass underflowed is recomputed exactly in the log domain.
// Everything runs on the current stream with no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "asag/checks.h"
#include "asag/op_common.h"
#include "asag/sinkhorn_math.h"

namespace asag {
namespace cuda {
namespace {

using math::neg_inf;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 32;
// Shared memory a row-step block may use: enough for Nk = 16384 column partials while
// keeping several blocks per SM resident.
constexpr size_t kRowSmemBudget = 64 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// r[row] = 1 / max(|x_row|, 1e-6) for x (rows, d): one warp per row.
template <typename T>
__global__ void inverse_norms_kernel(const T* __restrict__ x, int64_t rows, int64_t d,
                                     T* __restrict__ r) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // uniform within the warp
  T ss = 0;
  for (int64_t c = lane; c < d; c += 32) {
    const T v = x[row * d + c];
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) r[row] = math::inverse_norm(ss);
}

// L (chunk of slices, Nq x Nk) holds q k^T; replaces it by the adversarial logits plus bias,
// with -inf for masked keys. Slice sl of the chunk is global slice slice0 + sl.
template <typename T>
__global__ void logits_epilogue_kernel(T* __restrict__ L, int64_t slice0, int64_t nslices,
                                       int64_t heads, int64_t nq, int64_t nk,
                                       const T* __restrict__ rq, const T* __restrict__ rk,
                                       T scale, T lam, T inv_tau, BiasView<T> bias,
                                       const bool* __restrict__ valid) {
  const int64_t total = nslices * nq * nk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t j = idx % nk;
    const int64_t i = (idx / nk) % nq;
    const int64_t s = slice0 + idx / (nk * nq);
    T x = math::adversarial_logit(L[idx], rq[s * nq + i], rk[s * nk + j], scale, lam, inv_tau);
    if (bias.ptr != nullptr) {
      const int64_t b = s / heads, h = s % heads;
      x = math::clamp_logit(x + bias.ptr[b * bias.sb + h * bias.sh + i * bias.si + j * bias.sj]);
    }
    if (valid != nullptr && !valid[s * nk + j]) x = neg_inf<T>();
    L[idx] = x;
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
  extern __shared__ unsigned char smem_bytes[];
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

// Column step for every valid column of every chunk slice: one thread per column.
// c_j = sum of the row blocks' partials; g_j += log(Nq/Nk) - log(c_j), or, when c_j
// underflowed, g_j = log(Nq/Nk) - LSE_i(L_ij + f_i) computed exactly.
template <typename T>
__global__ void column_step_kernel(const T* __restrict__ L, const T* __restrict__ f,
                                   T* __restrict__ g, const T* __restrict__ colpart,
                                   int64_t nparts, int64_t nq, int64_t nk, int64_t slice0,
                                   const bool* __restrict__ valid,
                                   const T* __restrict__ log_marginal) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t sl = blockIdx.y;
  if (j >= nk) return;
  const int64_t s = slice0 + sl;
  if (valid != nullptr && !valid[s * nk + j]) return;
  const T* parts = colpart + sl * nparts * nk;
  T c = 0;
  for (int64_t p = 0; p < nparts; ++p) c += parts[p * nk + j];
  T gj = g[sl * nk + j];
  const T lm = log_marginal[s];
  if (!math::column_update(gj, c, lm)) {
    const T* Ls = L + sl * nq * nk;
    const T* fs = f + sl * nq;
    T run_max = neg_inf<T>(), run_sum = T(0);
    for (int64_t i = 0; i < nq; ++i) math::lse_accumulate(run_max, run_sum, Ls[i * nk + j] + fs[i]);
    math::exact_column_update(gj, run_max, run_sum, lm);
  }
  g[sl * nk + j] = gj;
}

// ---------------------------------------------------------------------------------------
// Host drivers.

// q k^T and P v in full fp32: TF32 would cost the logits three decimal digits.
struct NoTF32 {
  bool saved = at::globalContext().allowTF32CuBLAS();
  NoTF32() { at::globalContext().setAllowTF32CuBLAS(false); }
  ~NoTF32() { at::globalContext().setAllowTF32CuBLAS(saved); }
};

// How many slices to process at once: as many as fit in half of the free memory (counting
// what the caching allocator holds unused), at least one, and within the grid's y limit.
// While a CUDA graph is being captured, cudaMemGetInfo may not be called; the card's total
// memory less what the allocator has reserved stands in for it.
int64_t slices_per_chunk(int64_t S, int64_t bytes_per_slice) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  const int64_t reserved = stats.reserved_bytes[agg].current;
  const int64_t cached = reserved - stats.allocated_bytes[agg].current;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  size_t free_bytes = 0, total_bytes = 0;
  if (capture == cudaStreamCaptureStatusNone) {
    C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  } else {
    const int64_t total = at::cuda::getCurrentDeviceProperties()->totalGlobalMem;
    free_bytes = static_cast<size_t>(std::max<int64_t>(total - reserved, 0));
  }
  const int64_t budget = (static_cast<int64_t>(free_bytes) + std::max<int64_t>(cached, 0)) / 2;
  const int64_t fit = budget / std::max<int64_t>(bytes_per_slice, 1);
  return std::max<int64_t>(1, std::min<int64_t>({S, fit, 65535}));
}

struct RowLaunch {
  size_t smem = 0;
  bool col_in_smem = false, cache_row = false;
};

template <typename T>
RowLaunch row_launch(int64_t nk) {
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t budget = std::min(kRowSmemBudget, optin - 1024);
  const size_t row_bytes = nk * sizeof(T);
  RowLaunch r;
  if (row_bytes <= budget) {
    r.col_in_smem = true;
    r.smem = row_bytes;
  }
  if (r.col_in_smem && 2 * row_bytes <= budget) {
    r.cache_row = true;
    r.smem = 2 * row_bytes;
  }
  if (r.smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(row_step_kernel<T>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(r.smem)));
  }
  return r;
}

// Extra bytes per slice that the Sinkhorn scaling needs besides the logits.
template <typename T>
int64_t sinkhorn_workspace_bytes(int64_t nq, int64_t nk) {
  return (ceil_div(nq, kRowsPerBlock) * nk + nk + nq) * static_cast<int64_t>(sizeof(T));
}

// Turns the logits of `c` slices in L (c, Nq, Nk) into Sinkhorn plans, in place.
// `valid` (S, Nk) or null; `log_marginal` (S): log(Nq / valid keys) per global slice.
template <typename T>
void sinkhorn_chunk(T* L, int64_t c, int64_t slice0, int64_t nq, int64_t nk, const bool* valid,
                    const T* log_marginal, int64_t iters, const at::TensorOptions& opts) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t nparts = ceil_div(nq, kRowsPerBlock);
  at::Tensor g = at::zeros({c, nk}, opts);
  at::Tensor f = at::empty({c, nq}, opts);
  at::Tensor colpart = at::empty({iters > 0 ? c : 0, nparts, nk}, opts);
  const RowLaunch cfg = row_launch<T>(nk);
  const dim3 row_grid(static_cast<unsigned>(nparts), static_cast<unsigned>(c));
  const dim3 col_grid(static_cast<unsigned>(ceil_div(nk, kThreads)), static_cast<unsigned>(c));
  for (int64_t it = 0;; ++it) {
    const bool last = it == iters;  // the last step is a row step: rows sum to exactly 1
    row_step_kernel<T><<<row_grid, kThreads, cfg.smem, stream>>>(
        L, g.data_ptr<T>(), f.data_ptr<T>(), last ? nullptr : colpart.data_ptr<T>(), nq, nk,
        !last, last, cfg.col_in_smem, cfg.cache_row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (last) break;
    column_step_kernel<T><<<col_grid, kThreads, 0, stream>>>(
        L, f.data_ptr<T>(), g.data_ptr<T>(), colpart.data_ptr<T>(), nparts, nq, nk, slice0,
        valid, log_marginal);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// log(Nq / number of valid keys) per slice; `mask` is (S, Nk) bool or undefined.
at::Tensor log_marginals(const at::Tensor& mask, int64_t S, int64_t nq, int64_t nk,
                         const at::TensorOptions& opts) {
  const at::Tensor n_valid = mask.defined() ? mask.sum(-1).to(opts.dtype())
                                            : at::full({S}, static_cast<double>(nk), opts);
  return at::log(at::reciprocal(n_valid) * static_cast<double>(nq)).contiguous();
}

// r (S, N) <- inverse norms of the rows of x (S, N, D); D = 0 gives the floor's reciprocal.
template <typename T>
void launch_norms(const at::Tensor& x, at::Tensor& r) {
  const int64_t rows = x.size(0) * x.size(1);
  if (rows == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  inverse_norms_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(
      x.data_ptr<T>(), rows, x.size(-1), r.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// q k^T of slices [s0, s0 + c) into L, then the adversarial epilogue (+ bias, mask).
template <typename T>
void chunk_logits(at::Tensor& L, const at::Tensor& q3, const at::Tensor& k3, int64_t s0,
                  int64_t c, int64_t heads, const at::Tensor& rq, const at::Tensor& rk,
                  double lam, double tau, double scale, const BiasView<T>& bias,
                  const bool* valid) {
  const int64_t nq = q3.size(1), nk = k3.size(1);
  at::bmm_out(L, q3.narrow(0, s0, c), k3.narrow(0, s0, c).transpose(1, 2));
  const int64_t total = c * nq * nk;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 65535LL * 8);
  logits_epilogue_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
      L.data_ptr<T>(), s0, c, heads, nq, nk, rq.data_ptr<T>(), rk.data_ptr<T>(), T(scale),
      T(lam), T(1.0 / tau), bias, valid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------
// The ops.

at::Tensor adversarial_logits_cuda(const at::Tensor& q, const at::Tensor& k, double lam,
                                   double tau, double scale) {
  check_logits_call(q, k, lam, tau, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = accumulation_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), nk = k.size(2);
  at::Tensor out = at::empty({B, H, nq, nk}, q.options().dtype(acc));
  if (out.numel() == 0) return out;
  const NoTF32 full_fp32;
  AT_DISPATCH_FLOATING_TYPES(acc, "asag_adversarial_logits_cuda", [&] {
    const at::Tensor q3 = as_slices(q, acc), k3 = as_slices(k, acc);
    at::Tensor rq = at::empty({B * H, nq}, q3.options()), rk = at::empty({B * H, nk}, q3.options());
    launch_norms<scalar_t>(q3, rq);
    launch_norms<scalar_t>(k3, rk);
    at::Tensor out3 = out.view({B * H, nq, nk});
    chunk_logits<scalar_t>(out3, q3, k3, 0, B * H, H, rq, rk, lam, tau, scale, {}, nullptr);
  });
  return out;
}

at::Tensor sinkhorn_cuda(const at::Tensor& logits, int64_t iters,
                         const c10::optional<at::Tensor>& key_mask) {
  check_sinkhorn_call(logits, iters, key_mask);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  SinkhornInput in = sinkhorn_input(logits, key_mask);
  if (in.slices == 0) return in.plan.to(logits.scalar_type());
  const int64_t nq = logits.size(-2), nk = logits.size(-1), S = in.slices;
  const at::Tensor lm = log_marginals(in.mask, S, nq, nk, in.plan.options());
  AT_DISPATCH_FLOATING_TYPES(in.plan.scalar_type(), "asag_sinkhorn_cuda", [&] {
    const int64_t chunk = slices_per_chunk(S, sinkhorn_workspace_bytes<scalar_t>(nq, nk));
    for (int64_t s0 = 0; s0 < S; s0 += chunk) {
      const int64_t c = std::min(chunk, S - s0);
      sinkhorn_chunk<scalar_t>(in.plan3[s0].data_ptr<scalar_t>(), c, s0, nq, nk,
                               in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr,
                               lm.data_ptr<scalar_t>(), iters, in.plan.options());
    }
  });
  return in.plan.to(logits.scalar_type());
}

at::Tensor sinkhorn_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   double lam, int64_t iters, double tau, double scale,
                                   const c10::optional<at::Tensor>& key_mask,
                                   const c10::optional<at::Tensor>& attn_bias) {
  check_attention_call(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AttentionInputs in = attention_inputs(q, k, v, key_mask, attn_bias);
  if (in.empty()) return in.out.to(q.scalar_type());
  const int64_t H = in.H, S = in.S, nq = in.nq, nk = in.nk, dv = in.dv;
  const auto opts = q.options().dtype(in.acc);
  const at::Tensor& mask = in.mask;
  const at::Tensor lm = log_marginals(mask, S, nq, nk, opts);
  const NoTF32 full_fp32;
  AT_DISPATCH_FLOATING_TYPES(in.acc, "asag_sinkhorn_attention_cuda", [&] {
    const at::Tensor &q3 = in.q3, &k3 = in.k3, &v3 = in.v3;
    at::Tensor rq = at::empty({S, nq}, opts), rk = at::empty({S, nk}, opts);
    launch_norms<scalar_t>(q3, rq);
    launch_norms<scalar_t>(k3, rk);
    const BiasView<scalar_t> bv = bias_view<scalar_t>(in.bias);
    const bool* valid = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    const int64_t per_slice =
        nq * nk * static_cast<int64_t>(sizeof(scalar_t)) + sinkhorn_workspace_bytes<scalar_t>(nq, nk);
    const int64_t chunk = slices_per_chunk(S, per_slice);
    at::Tensor buffer = at::empty({chunk, nq, nk}, opts);
    at::Tensor out3 = in.out.view({S, nq, dv});
    for (int64_t s0 = 0; s0 < S; s0 += chunk) {
      const int64_t c = std::min(chunk, S - s0);
      at::Tensor L = buffer.narrow(0, 0, c);
      chunk_logits<scalar_t>(L, q3, k3, s0, c, H, rq, rk, lam, tau, scale, bv, valid);
      sinkhorn_chunk<scalar_t>(L.data_ptr<scalar_t>(), c, s0, nq, nk, valid,
                               lm.data_ptr<scalar_t>(), iters, opts);
      at::Tensor o = out3.narrow(0, s0, c);
      at::bmm_out(o, L, v3.narrow(0, s0, c));
    }
  });
  return in.out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(asag, CUDA, m) {
  m.impl("adversarial_logits", &adversarial_logits_cuda);
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_attention", &sinkhorn_attention_cuda);
}

}  // namespace cuda
}  // namespace asag
