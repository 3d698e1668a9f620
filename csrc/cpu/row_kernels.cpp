// The per-row kernels of row_kernels.h. Each *_impl template is inlined into an fp32 function
// compiled per ISA and an fp64 one (fp64 exists for tests; its speed does not matter).
#include "row_kernels.h"

#include <algorithm>

#include "asag/sinkhorn_math.h"

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (GCC function multiversioning), so one wheel is fast everywhere without -march=native.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(ASAG_NO_CPU_CLONES)
#define ASAG_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ASAG_CPU_CLONES
#endif

namespace asag {
namespace cpu {

using math::neg_inf;

// Logit epilogue on a block of rows of L, which holds q k^T on entry.
template <typename T>
ASAG_INLINE void logits_rows_impl(T* L, int64_t r0, int64_t r1, int64_t nk, const T* rq,
                                  const T* rk, T scale, T lam, T inv_tau, const T* bias,
                                  int64_t bias_si, int64_t bias_sj, const bool* valid) {
  for (int64_t i = r0; i < r1; ++i) {
    T* row = L + i * nk;
    const T rqi = rq[i];
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) {
      row[j] = math::adversarial_logit(row[j], rqi, rk[j], scale, lam, inv_tau);
    }
    if (bias != nullptr) {
      const T* brow = bias + i * bias_si;
      for (int64_t j = 0; j < nk; ++j) row[j] = math::clamp_logit(row[j] + brow[j * bias_sj]);
    }
    if (valid != nullptr) {
      for (int64_t j = 0; j < nk; ++j) row[j] = valid[j] ? row[j] : neg_inf<T>();
    }
  }
}

// Row steps on rows [r0, r1): f_i = -LSE_j(L_ij + g_j). When `col` is given, adds the
// plan P_ij = exp(L_ij + g_j + f_i) to col[j]; when `write_plan`, stores P_ij in L.
// `e` is a scratch row of nk values. A row with no reachable key gets P = 0, f = 0.
template <typename T>
ASAG_INLINE void row_steps_impl(T* L, int64_t r0, int64_t r1, int64_t nk, const T* g, T* f,
                                T* e, T* col, bool write_plan) {
  for (int64_t i = r0; i < r1; ++i) {
    T* row = L + i * nk;
    T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < nk; ++j) {
      const T t = row[j] + g[j];
      m = t > m ? t : m;
    }
    if (m == neg_inf<T>()) {
      f[i] = T(0);
      if (write_plan) std::fill(row, row + nk, T(0));
      continue;
    }
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < nk; ++j) {
      const T x = math::exp_nonpositive(row[j] + g[j] - m);
      e[j] = x;
      s += x;
    }
    f[i] = math::row_potential(m, s);
    const T inv_s = T(1) / s;
    if (col != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j) col[j] += e[j] * inv_s;
    }
    if (write_plan) {
#pragma omp simd
      for (int64_t j = 0; j < nk; ++j) row[j] = e[j] * inv_s;
    }
  }
}

// Exact log-domain column sums for the columns listed in `cols` (rare: only columns whose
// plan mass underflowed). Pass 1 takes max_i(L_ij + f_i), pass 2 sums exp(L_ij + f_i - max).
template <typename T>
ASAG_INLINE void column_lse_rows_impl(const T* L, int64_t r0, int64_t r1, int64_t nk,
                                      const T* f, const int64_t* cols, int64_t ncols,
                                      const T* cmax, T* out) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = L + i * nk;
    const T fi = f[i];
    for (int64_t c = 0; c < ncols; ++c) {
      const T x = row[cols[c]] + fi;
      if (cmax == nullptr) {
        out[c] = x > out[c] ? x : out[c];
      } else if (cmax[c] != neg_inf<T>()) {
        out[c] += math::exp_nonpositive(x - cmax[c]);
      }
    }
  }
}

ASAG_CPU_CLONES void logits_rows(float* L, int64_t r0, int64_t r1, int64_t nk, const float* rq,
                                 const float* rk, float scale, float lam, float inv_tau,
                                 const float* bias, int64_t bias_si, int64_t bias_sj,
                                 const bool* valid) {
  logits_rows_impl(L, r0, r1, nk, rq, rk, scale, lam, inv_tau, bias, bias_si, bias_sj, valid);
}
void logits_rows(double* L, int64_t r0, int64_t r1, int64_t nk, const double* rq,
                 const double* rk, double scale, double lam, double inv_tau, const double* bias,
                 int64_t bias_si, int64_t bias_sj, const bool* valid) {
  logits_rows_impl(L, r0, r1, nk, rq, rk, scale, lam, inv_tau, bias, bias_si, bias_sj, valid);
}

ASAG_CPU_CLONES void row_steps(float* L, int64_t r0, int64_t r1, int64_t nk, const float* g,
                               float* f, float* e, float* col, bool write_plan) {
  row_steps_impl(L, r0, r1, nk, g, f, e, col, write_plan);
}
void row_steps(double* L, int64_t r0, int64_t r1, int64_t nk, const double* g, double* f,
               double* e, double* col, bool write_plan) {
  row_steps_impl(L, r0, r1, nk, g, f, e, col, write_plan);
}

ASAG_CPU_CLONES void column_lse_rows(const float* L, int64_t r0, int64_t r1, int64_t nk,
                                     const float* f, const int64_t* cols, int64_t ncols,
                                     const float* cmax, float* out) {
  column_lse_rows_impl(L, r0, r1, nk, f, cols, ncols, cmax, out);
}
void column_lse_rows(const double* L, int64_t r0, int64_t r1, int64_t nk, const double* f,
                     const int64_t* cols, int64_t ncols, const double* cmax, double* out) {
  column_lse_rows_impl(L, r0, r1, nk, f, cols, ncols, cmax, out);
}

}  // namespace cpu
}  // namespace asag
