// Per-element maths of adversarial Sinkhorn attention, shared by the CPU and CUDA kernels.
//
// Everything here is a small inline function that compiles both as host code (g++) and as
// device code (nvcc), so the CPU tests exercise exactly the arithmetic the GPU runs.
// The definitions follow docs/method.md sections 1 and 4.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ASAG_HOST_DEVICE __host__ __device__
#define ASAG_INLINE __forceinline__
#else
#define ASAG_HOST_DEVICE
#define ASAG_INLINE inline __attribute__((always_inline))
#endif

namespace asag {
namespace math {

// Norms below this count as this (docs/method.md: max(|q|, 1e-6)).
constexpr double kNormFloor = 1e-6;

// Finite logits are clamped to +-kLogitMax so that potentials (f, g) and the sums
// M + f + g can never overflow fp32, whatever lam, tau and the inputs are. exp() of a
// difference of 1e30 already underflows to 0, so the clamp changes no probability
// that fp32 could represent.
template <typename T> struct Limits;
template <> struct Limits<float> {
  static constexpr float kLogitMax = 1e30f;
  // A column sum below this is too small to take its log reliably (its terms may be
  // denormal); such columns are updated exactly in the log domain instead.
  static constexpr float kTinyColumnSum = 1e-30f;
};
template <> struct Limits<double> {
  static constexpr double kLogitMax = 1e300;
  static constexpr double kTinyColumnSum = 1e-290;
};

template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// 1 / max(sqrt(sumsq), 1e-6): the reciprocal norm used by the adversarial cost.
template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE T inverse_norm(T sumsq) {
  T n = std::sqrt(sumsq);
  return T(1) / (n > T(kNormFloor) ? n : T(kNormFloor));
}

// Clamp a logit into [-kLogitMax, kLogitMax]. -inf (a masked key) stays -inf; NaN, which
// only arises when q.k itself overflowed the accumulation type, becomes -kLogitMax.
template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE T clamp_logit(T x) {
  const T hi = Limits<T>::kLogitMax;
  if (x != x) return -hi;
  if (x > hi) return hi;
  if (x < -hi && x != neg_inf<T>()) return -hi;
  return x;
}

// M[i, j] = (scale * dot - lam * cos) / tau, with cos = dot * rq_i * rk_j (docs/method.md 1.3).
// The cost is an epilogue on the one q k^T product. cos is formed first because it is
// bounded by 1, whereas lam * rq * rk alone can overflow for huge lam and tiny vectors.
template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE T adversarial_logit(T dot, T rq, T rk, T scale, T lam, T inv_tau) {
  const T cosine = dot * rq * rk;
  return clamp_logit((scale * dot - lam * cosine) * inv_tau);
}

// Bit pattern -> float (for 2^n in exp_nonpositive).
ASAG_HOST_DEVICE ASAG_INLINE float int_bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// exp(x) for x <= 0, the only arguments Sinkhorn needs (x = logit - row max).
// A branch-free Cephes-style range reduction and polynomial (about 1 ulp), written in
// plain arithmetic so that compilers vectorise it: the CPU's bottleneck is this function
// (docs/method.md section 4), and libm's scalar expf is several times slower. Arguments below
// -87.3 (results under FLT_MIN) give exactly 0, as do -inf (masked keys).
ASAG_HOST_DEVICE ASAG_INLINE float exp_nonpositive(float x) {
  const float lo = -87.33654f;
  const bool underflow = x < lo;  // also true for -inf
  x = x < lo ? lo : x;
  x = x > 0.f ? 0.f : x;
  // n = round(x / ln 2) through the 1.5 * 2^23 shifter trick (no rounding instruction).
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;   // ln 2, high part (exact in float)
  r = r - n * -2.12194440e-4f;      // ln 2, low part
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;  // n in [-126, 0]: a normal exponent
  const float scale = int_bits_to_float(e << 23);
  return underflow ? 0.f : p * scale;
}

ASAG_HOST_DEVICE ASAG_INLINE double exp_nonpositive(double x) {
  return std::exp(x);
}

// Row step (docs/method.md section 4): given the row max m of M + g and the sum s of
// exp(M + g - m), the new row potential is f = -(m + log s).
template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE T row_potential(T row_max, T row_sum) {
  return -(row_max + std::log(row_sum));
}

// Column step from the sums accumulated during the row step: c_j = sum_i P_ij, where
// P is the plan of the current potentials. g_j <- g_j + log(Nq / Nk) - log(c_j) equals
// the log-domain update g_j = log(Nq / Nk) - LSE_i(M_ij + f_i). Returns false when c_j
// is too small for its log to be trusted; the caller then uses the exact update.
template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE bool column_update(T& g, T column_sum, T log_marginal) {
  if (!(column_sum > Limits<T>::kTinyColumnSum)) return false;
  g = g + log_marginal - std::log(column_sum);
  return true;
}

// Exact column step from the column's log-sum-exp of M_ij + f_i (max and sum of
// exp(M_ij + f_i - max)). A column that no query can reach (max = -inf) keeps g.
template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE void exact_column_update(T& g, T col_max, T col_sum,
                                                      T log_marginal) {
  if (col_max == neg_inf<T>() || !(col_sum > T(0))) return;
  g = log_marginal - (col_max + std::log(col_sum));
}

// Online log-sum-exp: folds x into a running (max, sum of exp(. - max)); -inf adds nothing.
template <typename T>
ASAG_HOST_DEVICE ASAG_INLINE void lse_accumulate(T& run_max, T& run_sum, T x) {
  if (x == neg_inf<T>()) return;
  if (x > run_max) {
    run_sum = run_sum * exp_nonpositive(run_max - x) + T(1);
    run_max = x;
  } else {
    run_sum += exp_nonpositive(x - run_max);
  }
}

}  // namespace math
}  // namespace asag
