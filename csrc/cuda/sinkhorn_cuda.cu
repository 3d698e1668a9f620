// The CUDA ops: sinkhorn_kernels.cuh (device code) driven by sinkhorn_driver.h (host code) on a
// GPU. What is specific to a real device lives here: launches on the current stream, the
// shared-memory opt-in, the memory budget, and the two batched products through cuBLAS.
// Everything runs on the current stream with no host synchronisation; a CUDA graph can
// capture it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "asag/checks.h"
#include "sinkhorn_driver.h"

namespace asag {
namespace cuda {
namespace {

cudaDataType cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    default: TORCH_CHECK(false, "asag: no cuBLAS type for ", t);
  }
}

// C (c, m, n) = A (c, m, k) @ B, with B (c, n, k) when `b_transposed` (q k^T) or (c, k, n)
// (P v); all row-major and contiguous. In the *_PEDANTIC compute types: float32 (float64)
// arithmetic and accumulation whatever torch's TF32 settings, which are never touched;
// half-precision inputs are multiplied exactly into a float32 result.
void batched_product(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool b_transposed) {
  const int64_t batch = A.size(0), m = A.size(1), k = A.size(2);
  const int64_t n = b_transposed ? B.size(1) : B.size(2);
  if (batch == 0 || m == 0 || n == 0) return;
  if (k == 0) {
    C.zero_();
    return;
  }
  const bool dbl = C.scalar_type() == at::kDouble;
  const double alpha64 = 1.0, beta64 = 0.0;
  const float alpha32 = 1.f, beta32 = 0.f;
  const void* alpha = dbl ? static_cast<const void*>(&alpha64) : static_cast<const void*>(&alpha32);
  const void* beta = dbl ? static_cast<const void*>(&beta64) : static_cast<const void*>(&beta32);
  // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS's first operand is B.
  const auto op_b = b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int ldb = static_cast<int>(b_transposed ? k : n);
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      at::cuda::getCurrentCUDABlasHandle(), op_b, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
      static_cast<int>(k), alpha, B.data_ptr(), cuda_type(B.scalar_type()), ldb, n * k, A.data_ptr(),
      cuda_type(A.scalar_type()), static_cast<int>(k), m * k, beta, C.data_ptr(),
      cuda_type(C.scalar_type()), static_cast<int>(n), m * n, static_cast<int>(batch),
      dbl ? CUBLAS_COMPUTE_64F_PEDANTIC : CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
}

struct CudaDevice {
  template <typename... P, typename... A>
  static void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
    kernel<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename... P>
  static void allow_shared_memory(void (*kernel)(P...), size_t bytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }

  static size_t shared_memory_optin() {
    return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  }

  static int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

  // Half of the free memory, counting what the caching allocator holds unused. While a CUDA
  // graph is being captured cudaMemGetInfo may not be called: the card's total memory less
  // what the allocator has reserved stands in for the free memory.
  static int64_t memory_budget() {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    const int64_t reserved = stats.reserved_bytes[agg].current;
    const int64_t cached = reserved - stats.allocated_bytes[agg].current;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
    size_t free_bytes = 0, total_bytes = 0;
    if (capture == cudaStreamCaptureStatusNone) {
      C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    } else {
      const int64_t total = at::cuda::getCurrentDeviceProperties()->totalGlobalMem;
      free_bytes = static_cast<size_t>(std::max<int64_t>(total - reserved, 0));
    }
    return (static_cast<int64_t>(free_bytes) + std::max<int64_t>(cached, 0)) / 2;
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  static void product_qk(at::Tensor& L, const at::Tensor& q3, const at::Tensor& k3) {
    batched_product(L, q3, k3, /*b_transposed=*/true);
  }

  static void product_pv(at::Tensor& out, const at::Tensor& P, const at::Tensor& v3) {
    batched_product(out, P, v3, /*b_transposed=*/false);
  }
};

at::Tensor adversarial_logits_cuda(const at::Tensor& q, const at::Tensor& k, double lam,
                                   double tau, double scale) {
  check_logits_call(q, k, lam, tau, scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return adversarial_logits_impl<CudaDevice>(q, k, lam, tau, scale);
}

at::Tensor sinkhorn_cuda(const at::Tensor& logits, int64_t iters,
                         const c10::optional<at::Tensor>& key_mask) {
  check_sinkhorn_call(logits, iters, key_mask);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return sinkhorn_impl<CudaDevice>(logits, iters, key_mask);
}

at::Tensor sinkhorn_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   double lam, int64_t iters, double tau, double scale,
                                   const c10::optional<at::Tensor>& key_mask,
                                   const c10::optional<at::Tensor>& attn_bias) {
  check_attention_call(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return sinkhorn_attention_impl<CudaDevice>(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
}

at::Tensor sinkhorn_attention_streaming_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             double lam, int64_t iters, double tau, double scale,
                                             const c10::optional<at::Tensor>& key_mask,
                                             const c10::optional<at::Tensor>& attn_bias) {
  check_attention_call(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
  const c10::cuda::CUDAGuard device_guard(q.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return sinkhorn_attention_streaming_impl<CudaDevice>(q, k, v, lam, iters, tau, scale, key_mask, attn_bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(asag, CUDA, m) {
  m.impl("adversarial_logits", &adversarial_logits_cuda);
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_attention", &sinkhorn_attention_cuda);
  m.impl("sinkhorn_attention_streaming", &sinkhorn_attention_streaming_cuda);
}

}  // namespace cuda
}  // namespace asag
