// Entry point of asag._C: the op schemas (declared once, here) and build information.
// Device files add kernels with TORCH_LIBRARY_IMPL(asag, CPU/CUDA, m).
#include <torch/extension.h>
#include <torch/library.h>

#ifndef ASAG_TORCH_VERSION
#define ASAG_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(asag, m) {
  m.def("adversarial_logits(Tensor q, Tensor k, float lam, float tau, float scale) -> Tensor");
  m.def("sinkhorn(Tensor logits, int iters, Tensor? key_mask=None) -> Tensor");
  m.def(
      "sinkhorn_attention(Tensor q, Tensor k, Tensor v, float lam, int iters, float tau, "
      "float scale, Tensor? key_mask=None, Tensor? attn_bias=None) -> Tensor");
  // The same op without an Nq x Nk matrix: logits recomputed block by block in every sweep.
  m.def(
      "sinkhorn_attention_streaming(Tensor q, Tensor k, Tensor v, float lam, int iters, "
      "float tau, float scale, Tensor? key_mask=None, Tensor? attn_bias=None) -> Tensor");
}

namespace {

// Which instruction set the CPU kernels' multiversioned loops run with on this machine.
std::string cpu_isa() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(ASAG_NO_CPU_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA)";
  return "x86-64 (SSE2)";
#else
  return "generic (compiler default)";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu_kernels"] = true;
  info["cpu_isa"] = cpu_isa();
  info["cpu_streaming"] = true;
#ifdef ASAG_WITH_CUDA
  info["cuda_kernels"] = true;
  info["cuda_streaming"] = true;
  info["cuda_archs"] = ASAG_CUDA_ARCHS;
  info["cuda_version"] = ASAG_CUDA_VERSION;
#else
  info["cuda_kernels"] = false;
  info["cuda_streaming"] = false;
  info["cuda_archs"] = pybind11::none();
  info["cuda_version"] = pybind11::none();
#endif
  info["torch_version"] = ASAG_TORCH_VERSION;
#ifdef ASAG_DEBUG
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "asag compiled kernels (ops are registered as torch.ops.asag.*)";
  m.def("build_info", &build_info, "What this build of asag._C compiled.");
}
