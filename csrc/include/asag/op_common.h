// Host-side helpers shared by the CPU and CUDA implementations of the ops.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <vector>

namespace asag {

// The maths runs in float32 for half, bfloat16 and float32 inputs, in float64 for float64.
inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Converts an attention bias to the accumulation dtype (bool: True keeps, False masks) and
// expands it to `shape` (B, H, Nq, Nk) without copying.
inline at::Tensor prepare_bias(const at::Tensor& bias, at::ScalarType acc, at::IntArrayRef shape) {
  at::Tensor b;
  if (bias.scalar_type() == at::kBool) {
    b = at::where(bias, at::zeros({}, bias.options().dtype(acc)),
                  at::full({}, -std::numeric_limits<double>::infinity(),
                           bias.options().dtype(acc)));
  } else {
    b = bias.to(acc);
  }
  return b.expand(shape);
}

// The key mask of every (b, h) slice as a contiguous (S, Nk) bool tensor, from the (B, Nk)
// mask of an attention call (undefined when there is none).
inline at::Tensor slice_key_mask(const c10::optional<at::Tensor>& key_mask, int64_t heads) {
  if (!key_mask.has_value()) return at::Tensor();
  return key_mask->repeat_interleave(heads, 0).contiguous();
}

// The working copy of a sinkhorn() call: `plan` holds the logits in the accumulation dtype
// with masked keys at -inf, viewed as (S, Nq, Nk) in `plan3`; `mask` is the key mask as
// (S, Nk) (undefined without one). The kernels turn plan3 into the plan in place.
struct SinkhornInput {
  at::Tensor plan, plan3, mask;
  int64_t slices = 0;
};

inline SinkhornInput sinkhorn_input(const at::Tensor& logits,
                                    const c10::optional<at::Tensor>& key_mask) {
  SinkhornInput in;
  const int64_t nq = logits.size(-2), nk = logits.size(-1);
  in.plan = at::empty(logits.sizes(), logits.options().dtype(accumulation_dtype(logits.scalar_type())));
  if (in.plan.numel() == 0) return in;
  in.plan.copy_(logits);
  in.slices = in.plan.numel() / (nq * nk);
  in.plan3 = in.plan.view({in.slices, nq, nk});
  if (key_mask.has_value()) {
    std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end() - 2);
    shape.push_back(nk);
    in.mask = key_mask->expand(shape).contiguous().view({in.slices, nk});
    in.plan3.masked_fill_(in.mask.logical_not().unsqueeze(1),
                          -std::numeric_limits<double>::infinity());
  }
  return in;
}

}  // namespace asag
