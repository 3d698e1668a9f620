// CPU kernels of the asag ops: adversarial logits, batched log-domain Sinkhorn scaling and the
// fused Sinkhorn attention (docs/method.md sections 1 and 4).
//
// Work is split over (batch, head) slices when there are at least as many slices as threads,
// else over row blocks of one slice at a time; either way each worker holds at most one
// Nq x Nk fp32 block. One Sinkhorn iteration is one pass over that block: the row step's
// exponentials also give the column sums of the next column step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "asag/checks.h"
#include "asag/op_common.h"
#include "asag/sinkhorn_math.h"
#include "row_kernels.h"

namespace asag {
namespace cpu {
namespace {

using math::neg_inf;

// ---------------------------------------------------------------------------------------
// Slice-level drivers.

// Runs fn(begin, end, worker) over [0, n): in parallel row blocks, or as one block.
template <typename F>
void for_row_blocks(int64_t n, bool parallel, const F& fn) {
  if (!parallel) {
    fn(0, n, 0);
    return;
  }
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    fn(begin, end, at::get_thread_num());
  });
}

int workers(bool parallel) { return parallel ? at::get_num_threads() : 1; }

// Adds the per-worker partial rows of `parts` (workers x n) into its first row, with `op`.
template <typename T, typename Op>
void reduce_partials(std::vector<T>& parts, int64_t n, int nworkers, Op op) {
  for (int w = 1; w < nworkers; ++w) {
    for (int64_t j = 0; j < n; ++j) parts[j] = op(parts[j], parts[w * n + j]);
  }
}

// Exact column update g_j = log(Nq/Nk) - LSE_i(L_ij + f_i) for the columns in `cols`.
template <typename T>
void exact_column_updates(const T* L, int64_t nq, int64_t nk, const T* f,
                          const std::vector<int64_t>& cols, T* g, T log_marginal,
                          bool parallel) {
  const int64_t nc = static_cast<int64_t>(cols.size());
  const int nw = workers(parallel);
  std::vector<T> cmax(nw * nc, neg_inf<T>());
  std::vector<T> csum(nw * nc, T(0));
  for_row_blocks(nq, parallel, [&](int64_t r0, int64_t r1, int w) {
    column_lse_rows(L, r0, r1, nk, f, cols.data(), nc, nullptr, cmax.data() + w * nc);
  });
  reduce_partials(cmax, nc, nw, [](T a, T b) { return a > b ? a : b; });
  for_row_blocks(nq, parallel, [&](int64_t r0, int64_t r1, int w) {
    column_lse_rows(L, r0, r1, nk, f, cols.data(), nc, cmax.data(), csum.data() + w * nc);
  });
  reduce_partials(csum, nc, nw, [](T a, T b) { return a + b; });
  for (int64_t c = 0; c < nc; ++c) {
    math::exact_column_update(g[cols[c]], cmax[c], csum[c], log_marginal);
  }
}

// Turns the logits in L (nq x nk, row-major) into the Sinkhorn plan, in place.
// `valid` (nk, or null) marks the keys that take part; masked keys must already be -inf in L.
template <typename T>
void sinkhorn_inplace(T* L, int64_t nq, int64_t nk, const bool* valid, int64_t iters,
                      bool parallel) {
  if (nq == 0 || nk == 0) return;
  const int64_t nvalid = valid ? std::count(valid, valid + nk, true) : nk;
  if (nvalid == 0) {
    std::fill(L, L + nq * nk, T(0));
    return;
  }
  const T log_marginal = std::log(T(nq) / T(nvalid));
  const int nw = workers(parallel);
  std::vector<T> g(nk, T(0)), f(nq), col(nw * nk), e(nw * nk);
  std::vector<int64_t> tiny_columns;
  for (int64_t it = 0;; ++it) {
    const bool last = it == iters;  // the last step is a row step: rows sum to exactly 1
    if (!last) std::fill(col.begin(), col.end(), T(0));
    for_row_blocks(nq, parallel, [&](int64_t r0, int64_t r1, int w) {
      row_steps(L, r0, r1, nk, g.data(), f.data(), e.data() + w * nk,
                last ? nullptr : col.data() + w * nk, last);
    });
    if (last) break;
    reduce_partials(col, nk, nw, [](T a, T b) { return a + b; });
    tiny_columns.clear();
    for (int64_t j = 0; j < nk; ++j) {
      if (valid && !valid[j]) continue;
      if (!math::column_update(g[j], col[j], log_marginal)) tiny_columns.push_back(j);
    }
    if (!tiny_columns.empty()) {
      exact_column_updates(L, nq, nk, f.data(), tiny_columns, g.data(), log_marginal, parallel);
    }
  }
}

// Everything one slice of an attention or logits call needs, in the accumulation type.
template <typename T>
struct AttentionArgs {
  at::Tensor q, k, v;       // (S, N, D) contiguous, accumulation dtype
  at::Tensor out;           // (S, Nq, Dv) accumulation dtype, or undefined (logits only)
  int64_t heads = 1;
  T scale, lam, inv_tau;
  BiasView<T> bias;
  const bool* key_mask = nullptr;  // (S, Nk) contiguous
};

// L (Nq x Nk) <- adversarial logits of slice s, with bias and key mask applied.
template <typename T>
void slice_logits(const AttentionArgs<T>& a, int64_t s, at::Tensor& L, bool parallel) {
  const at::Tensor qs = a.q[s], ks = a.k[s];
  const int64_t nq = qs.size(0), nk = ks.size(0), d = qs.size(1);
  at::mm_out(L, qs, ks.t());
  std::vector<T> rq(nq), rk(nk);
  const T* qp = qs.data_ptr<T>();
  const T* kp = ks.data_ptr<T>();
  auto norms = [d](const T* x, int64_t n, T* r) {
    for (int64_t i = 0; i < n; ++i) {
      T ss = 0;
      for (int64_t c = 0; c < d; ++c) ss += x[i * d + c] * x[i * d + c];
      r[i] = math::inverse_norm(ss);
    }
  };
  norms(qp, nq, rq.data());
  norms(kp, nk, rk.data());
  const int64_t b = s / a.heads, h = s % a.heads;
  const T* bias = a.bias.ptr ? a.bias.ptr + b * a.bias.sb + h * a.bias.sh : nullptr;
  const bool* valid = a.key_mask ? a.key_mask + s * nk : nullptr;
  T* Lp = L.data_ptr<T>();
  for_row_blocks(nq, parallel, [&](int64_t r0, int64_t r1, int) {
    logits_rows(Lp, r0, r1, nk, rq.data(), rk.data(), a.scale, a.lam, a.inv_tau, bias,
                a.bias.si, a.bias.sj, valid);
  });
}

// Calls fn(s, L, parallel) for every slice, with one Nq x Nk buffer per worker. With at least
// as many slices as threads, slices run in parallel; otherwise each slice uses all threads.
// `own_buffer(s)` may return the output's own slice to write into instead of a buffer.
template <typename T, typename F, typename B>
void for_slices(int64_t S, int64_t nq, int64_t nk, const F& fn, const B& own_buffer) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto run = [&](int64_t s0, int64_t s1, bool parallel) {
    at::Tensor buffer;
    for (int64_t s = s0; s < s1; ++s) {
      at::Tensor L = own_buffer(s);
      if (!L.defined()) {
        if (!buffer.defined()) buffer = at::empty({nq, nk}, opts);
        L = buffer;
      }
      fn(s, L, parallel);
    }
  };
  if (S >= at::get_num_threads()) {
    at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) { run(s0, s1, false); });
  } else {
    run(0, S, true);
  }
}

// q3, k3, v3: (S, N, D) in the accumulation dtype (as_slices); v3, bias, mask may be undefined.
template <typename T>
AttentionArgs<T> make_args(const at::Tensor& q3, const at::Tensor& k3, const at::Tensor& v3,
                           int64_t heads, double lam, double tau, double scale,
                           const at::Tensor& bias, const at::Tensor& key_mask) {
  AttentionArgs<T> a;
  a.q = q3, a.k = k3, a.v = v3;
  a.heads = heads;
  a.scale = T(scale);
  a.lam = T(lam);
  a.inv_tau = T(1.0 / tau);
  a.bias = bias_view<T>(bias);
  if (key_mask.defined()) a.key_mask = key_mask.data_ptr<bool>();
  return a;
}

// ---------------------------------------------------------------------------------------
// The ops.

at::Tensor adversarial_logits_cpu(const at::Tensor& q, const at::Tensor& k, double lam,
                                  double tau, double scale) {
  check_logits_call(q, k, lam, tau, scale);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // internal at:: calls are not traced
  const auto acc = accumulation_dtype(q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), nk = k.size(2);
  at::Tensor out = at::empty({B, H, nq, nk}, q.options().dtype(acc));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(acc, "asag_adversarial_logits_cpu", [&] {
    auto a = make_args<scalar_t>(as_slices(q, acc), as_slices(k, acc), at::Tensor(), H, lam, tau,
                                 scale, at::Tensor(), at::Tensor());
    at::Tensor out3 = out.view({B * H, nq, nk});
    for_slices<scalar_t>(
        B * H, nq, nk,
        [&](int64_t s, at::Tensor& L, bool parallel) { slice_logits(a, s, L, parallel); },
        [&](int64_t s) { return out3[s]; });
  });
  return out;
}

at::Tensor sinkhorn_cpu(const at::Tensor& logits, int64_t iters,
                        const c10::optional<at::Tensor>& key_mask) {
  check_sinkhorn_call(logits, iters, key_mask);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  SinkhornInput in = sinkhorn_input(logits, key_mask);
  if (in.slices == 0) return in.plan.to(logits.scalar_type());
  const int64_t nq = logits.size(-2), nk = logits.size(-1);
  AT_DISPATCH_FLOATING_TYPES(in.plan.scalar_type(), "asag_sinkhorn_cpu", [&] {
    for_slices<scalar_t>(
        in.slices, nq, nk,
        [&](int64_t s, at::Tensor& L, bool parallel) {
          const bool* valid = in.mask.defined() ? in.mask.data_ptr<bool>() + s * nk : nullptr;
          sinkhorn_inplace(L.data_ptr<scalar_t>(), nq, nk, valid, iters, parallel);
        },
        [&](int64_t s) { return in.plan3[s]; });
  });
  return in.plan.to(logits.scalar_type());
}

at::Tensor sinkhorn_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  double lam, int64_t iters, double tau, double scale,
                                  const c10::optional<at::Tensor>& key_mask,
                                  const c10::optional<at::Tensor>& attn_bias) {
  check_attention_call(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AttentionInputs in = attention_inputs(q, k, v, key_mask, attn_bias);
  if (in.empty()) return in.out.to(q.scalar_type());
  const int64_t nq = in.nq, nk = in.nk;
  AT_DISPATCH_FLOATING_TYPES(in.acc, "asag_sinkhorn_attention_cpu", [&] {
    auto a = make_args<scalar_t>(in.q3, in.k3, in.v3, in.H, lam, tau, scale, in.bias, in.mask);
    at::Tensor out3 = in.out.view({in.S, nq, in.dv});
    for_slices<scalar_t>(
        in.S, nq, nk,
        [&](int64_t s, at::Tensor& L, bool parallel) {
          slice_logits(a, s, L, parallel);
          const bool* valid = a.key_mask ? a.key_mask + s * nk : nullptr;
          sinkhorn_inplace(L.data_ptr<scalar_t>(), nq, nk, valid, iters, parallel);
          at::Tensor o = out3[s];
          at::mm_out(o, L, a.v[s]);
        },
        [](int64_t) { return at::Tensor(); });
  });
  return in.out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(asag, CPU, m) {
  m.impl("adversarial_logits", &adversarial_logits_cpu);
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("sinkhorn_attention", &sinkhorn_attention_cpu);
}

}  // namespace cpu
}  // namespace asag
