// Argument checks of the asag ops, shared by every backend (CPU now, CUDA later).
// The Python wrappers check the same things first with friendlier ValueErrors; these
// guard direct calls of torch.ops.asag.*.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace asag {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kHalf || d == at::kBFloat16 || d == at::kFloat || d == at::kDouble, name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", d);
}

// Iterations are bounded so that a call always ends in reasonable time (a plan has long
// converged, or never will, well before this).
constexpr int64_t kMaxIters = 10000;

inline void check_params(double lam, double tau, double scale) {
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, "lam must be finite and >= 0, got ", lam);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
}

inline void check_iters(int64_t iters) {
  TORCH_CHECK(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK(iters <= kMaxIters, "iters must be at most ", kMaxIters, ", got ", iters);
}

// True when `shape` broadcasts to `target` (numpy rules).
inline bool broadcasts_to(at::IntArrayRef shape, at::IntArrayRef target) {
  if (shape.size() > target.size()) return false;
  const size_t off = target.size() - shape.size();
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] != 1 && shape[i] != target[off + i]) return false;
  }
  return true;
}

inline void check_qk(const at::Tensor& q, const at::Tensor& k) {
  check_float_tensor(q, "q");
  check_float_tensor(k, "k");
  TORCH_CHECK(q.dim() == 4, "q must have shape (B, H, Nq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must have shape (B, H, Nk, D), got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (",
              q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k must be on the device of q (", q.device(),
              "), got ", k.device());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have shape (B, H, Nk, D) matching q ", q.sizes(), ", got ", k.sizes());
}

inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& key_mask,
                            const c10::optional<at::Tensor>& attn_bias) {
  check_qk(q, k);
  check_float_tensor(v, "v");
  TORCH_CHECK(v.dim() == 4, "v must have shape (B, H, Nk, Dv), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must have the dtype of q (",
              q.scalar_type(), "), got ", v.scalar_type());
  TORCH_CHECK(v.device() == q.device(), "v must be on the device of q (", q.device(),
              "), got ", v.device());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "v must have shape (B, H, Nk, Dv) with B, H of q and Nk of k ", k.sizes(),
              ", got ", v.sizes());
  if (key_mask.has_value()) {
    const auto& m = *key_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "key_mask must be a bool tensor, got ",
                m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), "key_mask must be on the device of q");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(2),
                "key_mask must have shape (B, Nk) = (", q.size(0), ", ", k.size(2), "), got ",
                m.sizes());
  }
  if (attn_bias.has_value()) {
    const auto& b = *attn_bias;
    TORCH_CHECK(at::isFloatingType(b.scalar_type()) || b.scalar_type() == at::kBool,
                "attn_bias must be a floating-point or bool tensor, got ", b.scalar_type());
    TORCH_CHECK(b.device() == q.device(), "attn_bias must be on the device of q");
    TORCH_CHECK(broadcasts_to(b.sizes(), {q.size(0), q.size(1), q.size(2), k.size(2)}),
                "attn_bias must broadcast to (B, H, Nq, Nk) = (", q.size(0), ", ", q.size(1),
                ", ", q.size(2), ", ", k.size(2), "), got ", b.sizes());
  }
}

inline void check_sinkhorn(const at::Tensor& logits, const c10::optional<at::Tensor>& key_mask) {
  check_float_tensor(logits, "logits");
  TORCH_CHECK(logits.dim() >= 2, "logits must have shape (..., Nq, Nk), got ", logits.sizes());
  if (key_mask.has_value()) {
    const auto& m = *key_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "key_mask must be a bool tensor, got ",
                m.scalar_type());
    TORCH_CHECK(m.device() == logits.device(), "key_mask must be on the device of logits");
    std::vector<int64_t> target(logits.sizes().begin(), logits.sizes().end() - 2);
    target.push_back(logits.size(-1));
    // One meaning: the mask has the logits' leading dims (each may be 1) and Nk; a shorter mask
    // would broadcast from the right and silently mean another dim (a batch mask read per head).
    TORCH_CHECK(m.dim() == logits.dim() - 1 && broadcasts_to(m.sizes(), target),
                "key_mask must broadcast to (..., Nk) = ", at::IntArrayRef(target),
                ", one dim per leading dim of the logits (each may be 1), got ", m.sizes());
  }
}

// Every check of one call of each op (the kernels of every device start with these).
inline void check_logits_call(const at::Tensor& q, const at::Tensor& k, double lam, double tau,
                              double scale) {
  check_qk(q, k);
  check_params(lam, tau, scale);
}

inline void check_sinkhorn_call(const at::Tensor& logits, int64_t iters,
                                const c10::optional<at::Tensor>& key_mask) {
  check_sinkhorn(logits, key_mask);
  check_iters(iters);
}

inline void check_attention_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double lam, int64_t iters, double tau, double scale,
                                 const c10::optional<at::Tensor>& key_mask,
                                 const c10::optional<at::Tensor>& attn_bias) {
  check_attention(q, k, v, key_mask, attn_bias);
  check_params(lam, tau, scale);
  check_iters(iters);
}

}  // namespace asag
