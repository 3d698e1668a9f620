// Host-side helpers shared by the CPU and CUDA implementations of the ops.
#pragma once

#include <ATen/ATen.h>

#include <limits>

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

}  // namespace asag
