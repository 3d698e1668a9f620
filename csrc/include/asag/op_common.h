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

// x (B, H, N, D) as (B*H, N, D), contiguous, in the accumulation dtype.
inline at::Tensor as_slices(const at::Tensor& x, at::ScalarType acc) {
  return x.to(acc).contiguous().view({x.size(0) * x.size(1), x.size(2), x.size(3)});
}

// A bias expanded to (B, H, Nq, Nk): its data and strides (0 where it broadcasts), passed by
// value to the kernels of every device.
template <typename T>
struct BiasView {
  const T* ptr = nullptr;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

template <typename T>
BiasView<T> bias_view(const at::Tensor& bias) {
  BiasView<T> view;
  if (bias.defined()) {
    view.ptr = bias.data_ptr<T>();
    view.sb = bias.stride(0);
    view.sh = bias.stride(1);
    view.si = bias.stride(2);
    view.sj = bias.stride(3);
  }
  return view;
}

// The key mask of every (b, h) slice as a contiguous (S, Nk) bool tensor, from the (B, Nk)
// mask of an attention call (undefined when there is none).
inline at::Tensor slice_key_mask(const c10::optional<at::Tensor>& key_mask, int64_t heads) {
  if (!key_mask.has_value()) return at::Tensor();
  return key_mask->repeat_interleave(heads, 0).contiguous();
}

// The inputs of one sinkhorn_attention call, prepared alike for every device: the zero
// output (B, H, Nq, Dv) and q, k, v as (S, N, D) in the accumulation dtype, the bias expanded
// to (B, H, Nq, Nk), the key mask as (S, Nk). When `empty()`, the zero output is the answer.
struct AttentionInputs {
  int64_t B = 0, H = 0, S = 0, nq = 0, nk = 0, dv = 0;
  at::ScalarType acc = at::kFloat;
  at::Tensor out, q3, k3, v3, bias, mask;
  bool empty() const { return out.numel() == 0 || nk == 0; }
};

// With `qk_in_input_dtype`, q3 and k3 keep the inputs' dtype (for a half-precision product
// with float32 output, exact for those inputs); otherwise they are in the accumulation dtype.
inline AttentionInputs attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v,
                                        const c10::optional<at::Tensor>& key_mask,
                                        const c10::optional<at::Tensor>& attn_bias,
                                        bool qk_in_input_dtype = false) {
  AttentionInputs in;
  in.acc = accumulation_dtype(q.scalar_type());
  in.B = q.size(0), in.H = q.size(1), in.S = in.B * in.H;
  in.nq = q.size(2), in.nk = k.size(2), in.dv = v.size(3);
  in.out = at::zeros({in.B, in.H, in.nq, in.dv}, q.options().dtype(in.acc));
  if (in.empty()) return in;
  const at::ScalarType qk_dtype = qk_in_input_dtype ? q.scalar_type() : in.acc;
  in.q3 = as_slices(q, qk_dtype);
  in.k3 = as_slices(k, qk_dtype);
  in.v3 = as_slices(v, in.acc);
  if (attn_bias.has_value()) in.bias = prepare_bias(*attn_bias, in.acc, {in.B, in.H, in.nq, in.nk});
  in.mask = slice_key_mask(key_mask, in.H);
  return in;
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
  // As the attention op's logits: NaN -> -max (never chosen), +-inf -> +-max except -inf
  // (a masked key), so that non-finite logits give a finite plan.
  const double hi = in.plan.scalar_type() == at::kDouble ? 1e300 : 1e30;
  const at::Tensor masked = in.plan == -std::numeric_limits<double>::infinity();
  in.plan.nan_to_num_(-hi, hi, -hi).clamp_(-hi, hi).masked_fill_(masked, -std::numeric_limits<double>::infinity());
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
