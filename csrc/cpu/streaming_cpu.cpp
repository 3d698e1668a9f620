// Streaming Sinkhorn attention on the CPU: no Nq x Nk matrix (docs/method.md sections 1 and 4).
//
// Every Sinkhorn sweep recomputes the logits of one block of query rows at a time
// (kRowBlock rows x Nk, a BLAS product and the adversarial epilogue), runs the row step on
// them while they are in cache, and adds that block's plan to the column sums of the next
// column step, exactly as the materialised kernel does with its whole matrix: one sweep per
// iteration, one exponential per logit. The last sweep multiplies each block's plan by v.
// Memory per worker is (kRowBlock + 2) x Nk values, whatever Nq; columns whose sum underflows
// are recomputed exactly in the log domain, over row blocks and column chunks.
//
// Work is split over slices when there are at least as many as threads, else over the row
// blocks of one slice; column sums are reduced per worker in a fixed order (deterministic).
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

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColumnChunk = 256;  // flagged columns recomputed at a time

// One (batch, head) slice: q (Nq, D), k (Nk, D), v (Nk, Dv) in the accumulation dtype.
template <typename T>
struct Slice {
  at::Tensor q, k, v, out;
  std::vector<T> rq, rk;
  const T* bias = nullptr;  // at (b, h), with the BiasView's row and column strides
  int64_t bias_si = 0, bias_sj = 0;
  const bool* valid = nullptr;  // (Nk) or null
  T scale, lam, inv_tau;
};

template <typename T>
std::vector<T> inverse_norms(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  const T* p = x.data_ptr<T>();
  std::vector<T> r(n);
  for (int64_t i = 0; i < n; ++i) {
    T ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += p[i * d + c] * p[i * d + c];
    r[i] = math::inverse_norm(ss);
  }
  return r;
}

// Runs fn(r0, r1, worker) over row blocks of [0, n): in parallel, or all on this thread.
template <typename F>
void for_blocks(int64_t n, bool parallel, const F& fn) {
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  auto run = [&](int64_t b0, int64_t b1, int worker) {
    for (int64_t b = b0; b < b1; ++b) fn(b * kRowBlock, std::min(n, (b + 1) * kRowBlock), worker);
  };
  if (!parallel) {
    run(0, blocks, 0);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) { run(b0, b1, at::get_thread_num()); });
}

// Rows [r0, r1) of the logits into buf ((r1 - r0) x Nk): the product, then the epilogue.
template <typename T>
void block_logits(const Slice<T>& s, int64_t r0, int64_t r1, T* buf) {
  const int64_t nk = s.k.size(0);
  at::Tensor L = at::from_blob(buf, {r1 - r0, nk}, s.q.options());
  at::mm_out(L, s.q.narrow(0, r0, r1 - r0), s.k.t());
  const T* bias = s.bias != nullptr ? s.bias + r0 * s.bias_si : nullptr;
  logits_rows(buf, 0, r1 - r0, nk, s.rq.data() + r0, s.rk.data(), s.scale, s.lam, s.inv_tau, bias,
              s.bias_si, s.bias_sj, s.valid);
}

// Exact column update g_j = log(Nq/Nk) - LSE_i(M_ij + f_i) for the columns in `cols`, from
// logits recomputed for those columns only, row block by row block.
template <typename T>
void exact_columns(const Slice<T>& s, const std::vector<int64_t>& cols, const T* f, T* g,
                   T log_marginal, bool parallel) {
  const int64_t nq = s.q.size(0);
  const int nw = parallel ? at::get_num_threads() : 1;
  for (size_t c0 = 0; c0 < cols.size(); c0 += kColumnChunk) {
    const int64_t nc = std::min<int64_t>(kColumnChunk, cols.size() - c0);
    const at::Tensor index = at::from_blob(const_cast<int64_t*>(cols.data() + c0), {nc}, at::kLong);
    const at::Tensor kc = s.k.index_select(0, index);
    std::vector<T> rk(nc);
    for (int64_t c = 0; c < nc; ++c) rk[c] = s.rk[cols[c0 + c]];
    std::vector<T> run_max(nw * nc, neg_inf<T>()), run_sum(nw * nc, T(0));
    for_blocks(nq, parallel, [&](int64_t r0, int64_t r1, int w) {
      at::Tensor dots = at::mm(s.q.narrow(0, r0, r1 - r0), kc.t()).contiguous();
      const T* d = dots.data_ptr<T>();
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t j = cols[c0 + c];
          T x = math::adversarial_logit(d[(i - r0) * nc + c], s.rq[i], rk[c], s.scale, s.lam, s.inv_tau);
          if (s.bias != nullptr) x = math::clamp_logit(x + s.bias[i * s.bias_si + j * s.bias_sj]);
          math::lse_accumulate(run_max[w * nc + c], run_sum[w * nc + c], x + f[i]);
        }
      }
    });
    for (int64_t c = 0; c < nc; ++c) {
      T m = neg_inf<T>(), total = T(0);
      for (int w = 0; w < nw; ++w) {  // merge the workers' (max, sum) pairs in a fixed order
        const T wm = run_max[w * nc + c], ws = run_sum[w * nc + c];
        if (wm == neg_inf<T>()) continue;
        if (wm > m) {
          total = total * math::exp_nonpositive(m - wm) + ws;
          m = wm;
        } else {
          total += ws * math::exp_nonpositive(wm - m);
        }
      }
      math::exact_column_update(g[cols[c0 + c]], m, total, log_marginal);
    }
  }
}

// The whole streaming computation of one slice; writes s.out.
template <typename T>
void stream_slice(const Slice<T>& s, int64_t iters, bool parallel) {
  const int64_t nq = s.q.size(0), nk = s.k.size(0);
  const int64_t nvalid = s.valid ? std::count(s.valid, s.valid + nk, true) : nk;
  if (nvalid == 0) {
    s.out.zero_();
    return;
  }
  const T log_marginal = std::log(T(nq) / T(nvalid));
  const int nw = parallel ? at::get_num_threads() : 1;
  std::vector<T> g(nk, T(0)), f(nq), col(nw * nk), e(nw * nk), buf(nw * kRowBlock * nk);
  std::vector<int64_t> tiny_columns;
  for (int64_t it = 0;; ++it) {
    const bool last = it == iters;  // the last sweep is a row step, then P v
    if (!last) std::fill(col.begin(), col.end(), T(0));
    for_blocks(nq, parallel, [&](int64_t r0, int64_t r1, int w) {
      T* L = buf.data() + w * kRowBlock * nk;
      block_logits(s, r0, r1, L);
      row_steps(L, 0, r1 - r0, nk, g.data(), f.data() + r0, e.data() + w * nk,
                last ? nullptr : col.data() + w * nk, last);
      if (last) {
        at::Tensor o = s.out.narrow(0, r0, r1 - r0);
        at::mm_out(o, at::from_blob(L, {r1 - r0, nk}, s.q.options()), s.v);
      }
    });
    if (last) break;
    for (int w = 1; w < nw; ++w) {
      for (int64_t j = 0; j < nk; ++j) col[j] += col[w * nk + j];
    }
    tiny_columns.clear();
    for (int64_t j = 0; j < nk; ++j) {
      if (s.valid && !s.valid[j]) continue;
      if (!math::column_update(g[j], col[j], log_marginal)) tiny_columns.push_back(j);
    }
    if (!tiny_columns.empty()) exact_columns(s, tiny_columns, f.data(), g.data(), log_marginal, parallel);
  }
}

at::Tensor sinkhorn_attention_streaming_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            double lam, int64_t iters, double tau, double scale,
                                            const c10::optional<at::Tensor>& key_mask,
                                            const c10::optional<at::Tensor>& attn_bias) {
  check_attention_call(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AttentionInputs in = attention_inputs(q, k, v, key_mask, attn_bias);
  if (in.empty()) return in.out.to(q.scalar_type());
  const int64_t S = in.S, nk = in.nk;
  AT_DISPATCH_FLOATING_TYPES(in.acc, "asag_sinkhorn_attention_streaming_cpu", [&] {
    using T = scalar_t;
    const BiasView<T> bias = bias_view<T>(in.bias);
    at::Tensor out3 = in.out.view({S, in.nq, in.dv});
    auto slice = [&](int64_t s) {
      Slice<T> sl;
      sl.q = in.q3[s], sl.k = in.k3[s], sl.v = in.v3[s], sl.out = out3[s];
      sl.rq = inverse_norms<T>(sl.q), sl.rk = inverse_norms<T>(sl.k);
      if (bias.ptr != nullptr) {
        sl.bias = bias.ptr + (s / in.H) * bias.sb + (s % in.H) * bias.sh;
        sl.bias_si = bias.si, sl.bias_sj = bias.sj;
      }
      sl.valid = in.mask.defined() ? in.mask.data_ptr<bool>() + s * nk : nullptr;
      sl.scale = T(scale), sl.lam = T(lam), sl.inv_tau = T(1.0 / tau);
      return sl;
    };
    if (S >= at::get_num_threads()) {  // slices in parallel, each on one thread
      at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) stream_slice(slice(s), iters, false);
      });
    } else {
      for (int64_t s = 0; s < S; ++s) stream_slice(slice(s), iters, true);
    }
  });
  return in.out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(asag, CPU, m) {
  m.impl("sinkhorn_attention_streaming", &sinkhorn_attention_streaming_cpu);
}

}  // namespace cpu
}  // namespace asag
