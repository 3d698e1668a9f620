// Per-row kernels of the CPU ops, shared by the materialised path (sinkhorn_cpu.cpp) and the
// streaming one (streaming_cpu.cpp). Each hot loop is compiled for AVX-512, AVX2 and baseline
// x86-64 and picked at load time (row_kernels.cpp).
#pragma once

#include <cstdint>

namespace asag {
namespace cpu {

// Logit epilogue on rows [r0, r1) of L (rows of nk values), which hold q k^T on entry:
// adversarial logits, plus bias (row i at bias + i * bias_si, column stride bias_sj), -inf
// where `valid` is false. rq is indexed by row, rk by column.
void logits_rows(float* L, int64_t r0, int64_t r1, int64_t nk, const float* rq, const float* rk,
                 float scale, float lam, float inv_tau, const float* bias, int64_t bias_si,
                 int64_t bias_sj, const bool* valid);
void logits_rows(double* L, int64_t r0, int64_t r1, int64_t nk, const double* rq, const double* rk,
                 double scale, double lam, double inv_tau, const double* bias, int64_t bias_si,
                 int64_t bias_sj, const bool* valid);

// Row steps on rows [r0, r1): f_i = -LSE_j(L_ij + g_j). When `col` is given, adds the plan
// P_ij = exp(L_ij + g_j + f_i) to col[j]; when `write_plan`, stores P_ij in L. `e` is a scratch
// row of nk values. A row with no reachable key gets P = 0, f = 0.
void row_steps(float* L, int64_t r0, int64_t r1, int64_t nk, const float* g, float* f, float* e,
               float* col, bool write_plan);
void row_steps(double* L, int64_t r0, int64_t r1, int64_t nk, const double* g, double* f,
               double* e, double* col, bool write_plan);

// Exact log-domain column sums for the columns listed in `cols`: with cmax null, out[c] takes
// max_i(L_i,cols[c] + f_i); else out[c] adds exp(L_i,cols[c] + f_i - cmax[c]).
void column_lse_rows(const float* L, int64_t r0, int64_t r1, int64_t nk, const float* f,
                     const int64_t* cols, int64_t ncols, const float* cmax, float* out);
void column_lse_rows(const double* L, int64_t r0, int64_t r1, int64_t nk, const double* f,
                     const int64_t* cols, int64_t ncols, const double* cmax, double* out);

}  // namespace cpu
}  // namespace asag
