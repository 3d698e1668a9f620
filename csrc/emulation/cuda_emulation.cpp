// The CUDA ops run on the CPU: the kernels' own source (csrc/cuda/sinkhorn_kernels.cuh) and
// the very host driver the GPU build uses (csrc/cuda/sinkhorn_driver.h), on the emulated
// device of cuda_shim.h. Registered as torch.ops.asag_emu.* (CPU tensors); the tests compare
// them with the CPU kernel and the float64 reference on shapes that reach every kernel path.
//
// The emulated device's limits are arguments, so that small inputs can take the paths large
// ones take on a GPU: `shared_memory` (the per-block opt-in, bytes), `memory_budget` (bytes a
// chunk of slices may use: a small one forces several chunks) and `sm_count` (how many blocks
// grid-stride kernels get).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "asag/checks.h"
#include "asag/op_common.h"
#include "asag/sinkhorn_math.h"
// Everything above is ordinary host code; from here on CUDA spellings are emulated.
#include "cuda_shim.h"
#include "../cuda/sinkhorn_driver.h"

namespace asag {
namespace emulation {
namespace {

struct Limits {
  int64_t shared_memory = 227 * 1024, memory_budget = int64_t(1) << 40, sm_count = 2;
};

thread_local Limits limits;

struct EmulatedDevice {
  template <typename... P, typename... A>
  static void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
    asag_emu::launch(kernel, grid, block, smem, args...);
  }

  template <typename... P>
  static void allow_shared_memory(void (*)(P...), size_t bytes) {
    TORCH_CHECK(bytes <= static_cast<size_t>(limits.shared_memory), "emulated device: ", bytes,
                " bytes of shared memory requested, the opt-in limit is ", limits.shared_memory);
  }

  static size_t shared_memory_optin() { return static_cast<size_t>(limits.shared_memory); }
  static int64_t sm_count() { return limits.sm_count; }
  static int64_t memory_budget() { return limits.memory_budget; }

  // Work buffers start as NaN (integers as a large negative value): reading a value that no
  // kernel wrote shows in the result.
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    if (at::isFloatingType(options.dtype().toScalarType()))
      return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
    return at::full(sizes, -0x3f3f3f3f, options);
  }

  // The products a GPU gets from cuBLAS, in the accumulation dtype (exact products for
  // half-precision inputs, as there).
  static void product_qk(at::Tensor& L, const at::Tensor& q3, const at::Tensor& k3) {
    at::bmm_out(L, q3.to(L.scalar_type()), k3.to(L.scalar_type()).transpose(1, 2));
  }

  static void product_pv(at::Tensor& out, const at::Tensor& P, const at::Tensor& v3) {
    at::bmm_out(out, P, v3.to(out.scalar_type()));
  }
};

struct LimitsScope {
  Limits saved = limits;
  LimitsScope(int64_t shared_memory, int64_t memory_budget, int64_t sm_count) {
    TORCH_CHECK(shared_memory >= 0 && memory_budget > 0 && sm_count > 0,
                "emulated device limits must be positive");
    limits = Limits{shared_memory, memory_budget, sm_count};
    asag_emu::shared_memory_limit() = static_cast<size_t>(shared_memory);
  }
  ~LimitsScope() {
    limits = saved;
    asag_emu::shared_memory_limit() = static_cast<size_t>(saved.shared_memory);
  }
};

at::Tensor adversarial_logits(const at::Tensor& q, const at::Tensor& k, double lam, double tau,
                              double scale, int64_t shared_memory, int64_t memory_budget,
                              int64_t sm_count) {
  check_logits_call(q, k, lam, tau, scale);
  const LimitsScope scope(shared_memory, memory_budget, sm_count);
  return cuda::adversarial_logits_impl<EmulatedDevice>(q, k, lam, tau, scale);
}

at::Tensor sinkhorn(const at::Tensor& logits, int64_t iters, const c10::optional<at::Tensor>& key_mask,
                    int64_t shared_memory, int64_t memory_budget, int64_t sm_count) {
  check_sinkhorn_call(logits, iters, key_mask);
  const LimitsScope scope(shared_memory, memory_budget, sm_count);
  return cuda::sinkhorn_impl<EmulatedDevice>(logits, iters, key_mask);
}

at::Tensor sinkhorn_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              double lam, int64_t iters, double tau, double scale,
                              const c10::optional<at::Tensor>& key_mask,
                              const c10::optional<at::Tensor>& attn_bias, int64_t shared_memory,
                              int64_t memory_budget, int64_t sm_count) {
  check_attention_call(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
  const LimitsScope scope(shared_memory, memory_budget, sm_count);
  return cuda::sinkhorn_attention_impl<EmulatedDevice>(q, k, v, lam, iters, tau, scale, key_mask,
                                                       attn_bias);
}

at::Tensor sinkhorn_attention_streaming(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        double lam, int64_t iters, double tau, double scale,
                                        const c10::optional<at::Tensor>& key_mask,
                                        const c10::optional<at::Tensor>& attn_bias, int64_t shared_memory,
                                        int64_t memory_budget, int64_t sm_count) {
  check_attention_call(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
  const LimitsScope scope(shared_memory, memory_budget, sm_count);
  return cuda::sinkhorn_attention_streaming_impl<EmulatedDevice>(q, k, v, lam, iters, tau, scale, key_mask,
                                                                 attn_bias);
}

}  // namespace

TORCH_LIBRARY(asag_emu, m) {
  m.def("adversarial_logits(Tensor q, Tensor k, float lam, float tau, float scale, int shared_memory, "
        "int memory_budget, int sm_count) -> Tensor");
  m.def("sinkhorn(Tensor logits, int iters, Tensor? key_mask, int shared_memory, int memory_budget, "
        "int sm_count) -> Tensor");
  m.def("sinkhorn_attention(Tensor q, Tensor k, Tensor v, float lam, int iters, float tau, float scale, "
        "Tensor? key_mask, Tensor? attn_bias, int shared_memory, int memory_budget, int sm_count) -> Tensor");
  m.def("sinkhorn_attention_streaming(Tensor q, Tensor k, Tensor v, float lam, int iters, float tau, "
        "float scale, Tensor? key_mask, Tensor? attn_bias, int shared_memory, int memory_budget, "
        "int sm_count) -> Tensor");
}

TORCH_LIBRARY_IMPL(asag_emu, CPU, m) {
  m.impl("adversarial_logits", &adversarial_logits);
  m.impl("sinkhorn", &sinkhorn);
  m.impl("sinkhorn_attention", &sinkhorn_attention);
  m.impl("sinkhorn_attention_streaming", &sinkhorn_attention_streaming);
}

}  // namespace emulation
}  // namespace asag

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "asag's CUDA kernels run on the CPU (ops registered as torch.ops.asag_emu.*)";
}
