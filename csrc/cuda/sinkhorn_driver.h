// Host side of the CUDA ops: chunking, launch configuration and the order of the kernels.
//
// Written once for a `Device` policy, so that the very same driver runs on a GPU
// (sinkhorn_cuda.cu: CUDA launches, cuBLAS products) and in CI on the CPU through the
// emulation (csrc/emulation: every CUDA thread an OS thread, ATen products on the CPU).
// A Device provides:
//   launch(kernel, grid, block, shared_bytes, args...)   run a kernel
//   allow_shared_memory(kernel, bytes)                    opt a kernel in to > 48 KB
//   shared_memory_optin(), sm_count(), memory_budget()    what the device offers
//   empty(sizes, options)                                 a work buffer
//   product_qk(L, q3, k3), product_pv(out, P, v3)         the two batched matrix products
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "asag/checks.h"
#include "asag/op_common.h"
#include "sinkhorn_kernels.cuh"
#include "streaming_kernels.cuh"

namespace asag {
namespace cuda {

// Shared memory a row-step block may use: enough for Nk = 16384 column partials while keeping
// several blocks per SM resident.
constexpr size_t kRowSmemBudget = 64 * 1024;
constexpr size_t kDefaultSharedMemory = 48 * 1024;  // what needs no opt-in

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride kernels get a few blocks per SM: enough to fill the device, no more.
template <typename Device>
unsigned stride_blocks(int64_t work_blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(work_blocks, 8 * Device::sm_count())));
}

// How many slices to process at once: as many as fit in the device's memory budget, at least
// one, and within the grid's y limit.
template <typename Device>
int64_t slices_per_chunk(int64_t S, int64_t bytes_per_slice) {
  const int64_t fit = Device::memory_budget() / std::max<int64_t>(bytes_per_slice, 1);
  return std::max<int64_t>(1, std::min<int64_t>({S, fit, 65535}));
}

struct RowLaunch {
  size_t smem = 0;
  bool col_in_smem = false, cache_row = false;
};

// Column partials in shared memory while a row of them fits the budget; the row itself
// cached there too while two rows fit (one exponential per logit per iteration).
template <typename Device, typename T>
RowLaunch row_launch(int64_t nk) {
  const size_t optin = Device::shared_memory_optin();
  const size_t budget = std::min(kRowSmemBudget, optin > 1024 ? optin - 1024 : 0);
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
  if (r.smem > kDefaultSharedMemory) Device::allow_shared_memory(row_step_kernel<T>, r.smem);
  return r;
}

// Extra bytes per slice that the Sinkhorn scaling needs besides the logits.
template <typename T>
int64_t sinkhorn_workspace_bytes(int64_t nq, int64_t nk) {
  return (ceil_div(nq, kRowsPerBlock) * nk + nk + nq) * static_cast<int64_t>(sizeof(T)) +
         nk * static_cast<int64_t>(sizeof(int));
}

// Turns the logits of `c` slices in L (c, Nq, Nk) into Sinkhorn plans, in place.
// `valid` (S, Nk) or null; `log_marginal` (S): log(Nq / valid keys) per global slice.
template <typename Device, typename T>
void sinkhorn_chunk(T* L, int64_t c, int64_t slice0, int64_t nq, int64_t nk, const bool* valid,
                    const T* log_marginal, int64_t iters, const at::TensorOptions& opts) {
  const int64_t nparts = ceil_div(nq, kRowsPerBlock);
  at::Tensor g = at::zeros({c, nk}, opts);
  at::Tensor f = Device::empty({c, nq}, opts);
  at::Tensor colpart = Device::empty({iters > 0 ? c : 0, nparts, nk}, opts);
  at::Tensor flags = Device::empty({iters > 0 ? c : 0, nk}, opts.dtype(at::kInt));
  const RowLaunch cfg = row_launch<Device, T>(nk);
  const dim3 row_grid(static_cast<unsigned>(nparts), static_cast<unsigned>(c));
  const dim3 col_grid(stride_blocks<Device>(ceil_div(nk, kThreads)), static_cast<unsigned>(c));
  const dim3 exact_grid(stride_blocks<Device>(nk), static_cast<unsigned>(c));
  for (int64_t it = 0;; ++it) {
    const bool last = it == iters;  // the last step is a row step: rows sum to exactly 1
    Device::launch(row_step_kernel<T>, row_grid, dim3(kThreads), cfg.smem, L, g.data_ptr<T>(),
                   f.data_ptr<T>(), last ? nullptr : colpart.data_ptr<T>(), nq, nk, !last, last,
                   cfg.col_in_smem, cfg.cache_row);
    if (last) break;
    Device::launch(column_step_kernel<T>, col_grid, dim3(kThreads), 0, g.data_ptr<T>(),
                   colpart.data_ptr<T>(), nparts, nk, slice0, valid, log_marginal,
                   flags.data_ptr<int>());
    Device::launch(exact_column_kernel<T>, exact_grid, dim3(kThreads), 0, L, f.data_ptr<T>(),
                   g.data_ptr<T>(), flags.data_ptr<int>(), nq, nk, slice0, log_marginal);
  }
}

// log(Nq / number of valid keys) per slice; `mask` is (S, Nk) bool or undefined.
inline at::Tensor log_marginals(const at::Tensor& mask, int64_t S, int64_t nq, int64_t nk,
                                const at::TensorOptions& opts) {
  const at::Tensor n_valid = mask.defined() ? mask.sum(-1).to(opts.dtype())
                                            : at::full({S}, static_cast<double>(nk), opts);
  return at::log(at::reciprocal(n_valid) * static_cast<double>(nq)).contiguous();
}

// r (S, N) <- inverse norms of the rows of x (S, N, D), read in x's dtype, summed in T.
template <typename Device, typename T>
void launch_norms(const at::Tensor& x, at::Tensor& r) {
  const int64_t rows = x.size(0) * x.size(1);
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "asag_norms", [&] {
    Device::launch(inverse_norms_kernel<scalar_t, T>, dim3(stride_blocks<Device>(ceil_div(rows, kWarps))),
                   dim3(kThreads), 0, x.data_ptr<scalar_t>(), rows, x.size(-1), r.data_ptr<T>());
  });
}

// q k^T of slices [s0, s0 + c) into L, then the adversarial epilogue (+ bias, mask).
template <typename Device, typename T>
void chunk_logits(at::Tensor& L, const at::Tensor& q3, const at::Tensor& k3, int64_t s0,
                  int64_t c, int64_t heads, const at::Tensor& rq, const at::Tensor& rk,
                  double lam, double tau, double scale, const BiasView<T>& bias,
                  const bool* valid) {
  const int64_t nq = q3.size(1), nk = k3.size(1);
  Device::product_qk(L, q3.narrow(0, s0, c), k3.narrow(0, s0, c));
  const int64_t per_slice = nq * nk;
  const dim3 grid(stride_blocks<Device>(ceil_div(per_slice, kThreads)), static_cast<unsigned>(c));
  if (per_slice <= std::numeric_limits<int32_t>::max()) {  // 32-bit indices within a slice
    Device::launch(logits_epilogue_kernel<T, int32_t>, grid, dim3(kThreads), 0, L.data_ptr<T>(), s0,
                   heads, static_cast<int32_t>(nq), static_cast<int32_t>(nk), rq.data_ptr<T>(),
                   rk.data_ptr<T>(), T(scale), T(lam), T(1.0 / tau), bias, valid);
  } else {
    Device::launch(logits_epilogue_kernel<T, int64_t>, grid, dim3(kThreads), 0, L.data_ptr<T>(), s0,
                   heads, nq, nk, rq.data_ptr<T>(), rk.data_ptr<T>(), T(scale), T(lam),
                   T(1.0 / tau), bias, valid);
  }
}

// ---- the three ops, for any device ------------------------------------------------------------

template <typename Device>
at::Tensor adversarial_logits_impl(const at::Tensor& q, const at::Tensor& k, double lam, double tau,
                                   double scale) {
  const auto acc = accumulation_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), nk = k.size(2);
  at::Tensor out = at::empty({B, H, nq, nk}, q.options().dtype(acc));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(acc, "asag_adversarial_logits", [&] {
    const at::Tensor q3 = as_slices(q, q.scalar_type()), k3 = as_slices(k, k.scalar_type());
    at::Tensor rq = at::empty({B * H, nq}, out.options()), rk = at::empty({B * H, nk}, out.options());
    launch_norms<Device, scalar_t>(q3, rq);
    launch_norms<Device, scalar_t>(k3, rk);
    at::Tensor out3 = out.view({B * H, nq, nk});
    chunk_logits<Device, scalar_t>(out3, q3, k3, 0, B * H, H, rq, rk, lam, tau, scale, {}, nullptr);
  });
  return out;
}

template <typename Device>
at::Tensor sinkhorn_impl(const at::Tensor& logits, int64_t iters, const c10::optional<at::Tensor>& key_mask) {
  SinkhornInput in = sinkhorn_input(logits, key_mask);
  if (in.slices == 0) return in.plan.to(logits.scalar_type());
  const int64_t nq = logits.size(-2), nk = logits.size(-1), S = in.slices;
  const at::Tensor lm = log_marginals(in.mask, S, nq, nk, in.plan.options());
  AT_DISPATCH_FLOATING_TYPES(in.plan.scalar_type(), "asag_sinkhorn", [&] {
    const int64_t chunk = slices_per_chunk<Device>(S, sinkhorn_workspace_bytes<scalar_t>(nq, nk));
    for (int64_t s0 = 0; s0 < S; s0 += chunk) {
      const int64_t c = std::min(chunk, S - s0);
      sinkhorn_chunk<Device, scalar_t>(in.plan3[s0].data_ptr<scalar_t>(), c, s0, nq, nk,
                                       in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr,
                                       lm.data_ptr<scalar_t>(), iters, in.plan.options());
    }
  });
  return in.plan.to(logits.scalar_type());
}

template <typename Device>
at::Tensor sinkhorn_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   double lam, int64_t iters, double tau, double scale,
                                   const c10::optional<at::Tensor>& key_mask,
                                   const c10::optional<at::Tensor>& attn_bias) {
  const AttentionInputs in = attention_inputs(q, k, v, key_mask, attn_bias, /*qk_in_input_dtype=*/true);
  if (in.empty()) return in.out.to(q.scalar_type());
  const int64_t H = in.H, S = in.S, nq = in.nq, nk = in.nk, dv = in.dv;
  const auto opts = q.options().dtype(in.acc);
  const at::Tensor& mask = in.mask;
  const at::Tensor lm = log_marginals(mask, S, nq, nk, opts);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "asag_sinkhorn_attention", [&] {
    const at::Tensor &q3 = in.q3, &k3 = in.k3, &v3 = in.v3;
    at::Tensor rq = at::empty({S, nq}, opts), rk = at::empty({S, nk}, opts);
    launch_norms<Device, scalar_t>(q3, rq);
    launch_norms<Device, scalar_t>(k3, rk);
    const BiasView<scalar_t> bv = bias_view<scalar_t>(in.bias);
    const bool* valid = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    const int64_t per_slice =
        nq * nk * static_cast<int64_t>(sizeof(scalar_t)) + sinkhorn_workspace_bytes<scalar_t>(nq, nk);
    const int64_t chunk = slices_per_chunk<Device>(S, per_slice);
    at::Tensor buffer = Device::empty({chunk, nq, nk}, opts);
    at::Tensor out3 = in.out.view({S, nq, dv});
    for (int64_t s0 = 0; s0 < S; s0 += chunk) {
      const int64_t c = std::min(chunk, S - s0);
      at::Tensor L = buffer.narrow(0, 0, c);
      chunk_logits<Device, scalar_t>(L, q3, k3, s0, c, H, rq, rk, lam, tau, scale, bv, valid);
      sinkhorn_chunk<Device, scalar_t>(L.data_ptr<scalar_t>(), c, s0, nq, nk, valid,
                                       lm.data_ptr<scalar_t>(), iters, opts);
      at::Tensor o = out3.narrow(0, s0, c);
      Device::product_pv(o, L, v3.narrow(0, s0, c));
    }
  });
  return in.out.to(q.scalar_type());
}

// Streaming: no Nq x Nk matrix. Per iteration a row sweep (f) and a column sweep (g), then
// a row sweep that also multiplies the plan by v; every sweep recomputes its logits tile by
// tile. Slices go 65535 at a time (the grid's y limit); memory is O(Nq + Nk) per slice.
template <typename Device>
at::Tensor sinkhorn_attention_streaming_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             double lam, int64_t iters, double tau, double scale,
                                             const c10::optional<at::Tensor>& key_mask,
                                             const c10::optional<at::Tensor>& attn_bias) {
  const AttentionInputs in = attention_inputs(q, k, v, key_mask, attn_bias, /*qk_in_input_dtype=*/true);
  if (in.empty()) return in.out.to(q.scalar_type());
  const int64_t H = in.H, S = in.S, nq = in.nq, nk = in.nk, d = in.q3.size(2), dv = in.dv;
  const auto opts = q.options().dtype(in.acc);
  const at::Tensor lm = log_marginals(in.mask, S, nq, nk, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q3.scalar_type(), "asag_streaming", [&] {
    using In = scalar_t;
    using T = typename std::conditional<std::is_same<In, double>::value, double, float>::type;
    at::Tensor rq = at::empty({S, nq}, opts), rk = at::empty({S, nk}, opts);
    launch_norms<Device, T>(in.q3, rq);
    launch_norms<Device, T>(in.k3, rk);
    at::Tensor f = Device::empty({S, nq}, opts), g = at::zeros({S, nk}, opts);
    const BiasView<T> bv = bias_view<T>(in.bias);
    const bool* valid = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
    const In *qp = in.q3.data_ptr<In>(), *kp = in.k3.data_ptr<In>();
    const T *vp = in.v3.data_ptr<T>(), *rqp = rq.data_ptr<T>(), *rkp = rk.data_ptr<T>();
    T *fp = f.data_ptr<T>(), *gp = g.data_ptr<T>(), *op = in.out.data_ptr<T>();
    for (int64_t s0 = 0; s0 < S; s0 += 65535) {
      const unsigned c = static_cast<unsigned>(std::min<int64_t>(65535, S - s0));
      const dim3 rows(static_cast<unsigned>(ceil_div(nq, kTileM)), c), cols(static_cast<unsigned>(ceil_div(nk, kTileM)), c);
      for (int64_t it = 0;; ++it) {
        const bool last = it == iters;
        Device::launch(stream_rows_kernel<In, T>, rows, dim3(kStreamThreads), 0, qp, kp, vp, rqp, rkp, gp, fp, op,
                       nq, nk, d, dv, s0, H, T(scale), T(lam), T(1.0 / tau), bv, valid, last);
        if (last) break;
        Device::launch(stream_columns_kernel<In, T>, cols, dim3(kStreamThreads), 0, qp, kp, rqp, rkp, fp, gp,
                       nq, nk, d, s0, H, T(scale), T(lam), T(1.0 / tau), bv, valid, lm.data_ptr<T>());
      }
    }
  });
  return in.out.to(q.scalar_type());
}

}  // namespace cuda
}  // namespace asag
