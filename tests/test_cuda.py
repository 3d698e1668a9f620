"""The CUDA kernels against the float64 reference and the CPU kernel (skipped without a GPU
or without CUDA kernels in the build). benchmarks/gpu_check.sh runs these on a GPU machine."""

import pytest
import torch

import asag
from asag.ops import reference
from helpers import (
    AWKWARD_SHAPES,
    HALF_DTYPES,
    PARAMS,
    make_qkv,
    max_err,
    params_id,
    random_key_mask,
    reference64,
    shape_id,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        not asag.build_info().get("cuda_kernels"), reason="asag._C was built without CUDA kernels"
    ),
]

SHAPES = AWKWARD_SHAPES + [
    (2, 4, 333, 257, 64, 64),
    (1, 2, 64, 20000, 64, 64),  # Nk past the shared-memory row cache
    (1, 1, 8, 70000, 16, 16),  # Nk past the shared-memory column partials
]


STD = 2.5  # peaked enough that every iteration still moves the result


def _scale(q):
    return q.shape[-1] ** -0.5


def _fp_tolerance(dtype, ref, nk=1):
    """float32 lands within a few 1e-6 of the output's size (more for long rows, whose sums
    gather more rounding); float64 within round-off."""
    rel = 8e-6 * max(1.0, (nk / 4096) ** 0.5) if dtype != torch.float64 else 1e-12
    return rel * ref.abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("params", PARAMS, ids=params_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_matches_float64_and_cpu(shape, params, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype, seed=sum(shape), std=STD)
    ref = reference64(q, k, v, scale=_scale(q), **params)
    out = asag.ops.sinkhorn_attention(q.cuda(), k.cuda(), v.cuda(), backend="kernel", **params)
    assert out.is_cuda and out.dtype == dtype
    tol = _fp_tolerance(dtype, ref, shape[3])
    assert max_err(out.cpu(), ref) <= tol
    cpu = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params)
    assert max_err(out.cpu(), cpu) <= tol


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:9], ids=shape_id)
def test_cuda_half_precision(dtype, shape):
    params = dict(lam=2.0, iters=5)
    q, k, v = make_qkv(*shape, dtype=dtype, seed=3)
    ref = reference64(q, k, v, scale=_scale(q), **params)
    out = asag.ops.sinkhorn_attention(q.cuda(), k.cuda(), v.cuda(), backend="kernel", **params)
    in_dtype = reference.sinkhorn_attention(q.cuda(), k.cuda(), v.cuda(), scale=_scale(q), compute_dtype=dtype, **params)
    assert out.dtype == dtype
    assert max_err(out.cpu(), ref) <= 2 * max_err(in_dtype.cpu(), ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_masks_and_biases(dtype):
    b, h, nq, nk, d = 2, 3, 65, 91, 64
    q, k, v = make_qkv(b, h, nq, nk, d, dtype=dtype, seed=4)
    mask = random_key_mask(b, nk)
    mask[1, :] = False  # a batch row with no valid key
    bias = torch.randn(1, h, nq, nk).to(dtype)
    params = dict(lam=1.0, iters=6, key_mask=mask, attn_bias=bias)
    ref = reference64(q, k, v, scale=_scale(q), **params)
    cuda_params = dict(params, key_mask=mask.cuda(), attn_bias=bias.cuda())
    out = asag.ops.sinkhorn_attention(q.cuda(), k.cuda(), v.cuda(), backend="kernel", **cuda_params)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, _fp_tolerance(dtype, ref))
    assert max_err(out.cpu(), ref) <= tol
    assert (out[1] == 0).all()


def test_cuda_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 50, 4, 64, generator=g).cuda().transpose(1, 2)
    k = torch.randn(2, 60, 4, 64, generator=g).cuda().transpose(1, 2)
    v = torch.randn(2, 60, 4, 32, generator=g).cuda().transpose(1, 2)
    out = asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=4, backend="kernel")
    ref = reference64(q.cpu(), k.cpu(), v.cpu(), lam=2.0, iters=4, scale=64**-0.5)
    assert max_err(out.cpu(), ref) <= _fp_tolerance(torch.float32, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_sinkhorn_and_logits(dtype):
    logits = (torch.randn(3, 4, 129, 77) * 3).to(dtype)
    mask = torch.rand(3, 1, 77) > 0.3
    plan = asag.ops.sinkhorn(logits.cuda(), iters=8, key_mask=mask.cuda(), backend="kernel")
    ref = reference.sinkhorn(logits.double(), iters=8, key_mask=mask)
    assert max_err(plan.cpu(), ref) <= (2e-6 if dtype == torch.float32 else 2e-3)
    q, k, _ = make_qkv(2, 2, 37, 29, 72, dtype=dtype, seed=9)
    m = asag.ops.adversarial_logits(q.cuda(), k.cuda(), lam=3.0, backend="kernel")
    mref = reference.adversarial_logits(q.double(), k.double(), lam=3.0, scale=72**-0.5)
    assert max_err(m.cpu(), mref) <= (2e-6 if dtype == torch.float32 else 1e-5) * mref.abs().max().item()


def test_cuda_extremes_stay_finite():
    q, k, v = make_qkv(1, 2, 40, 50, 32, dtype=torch.float16, seed=5, device="cuda")
    for lam, tau in [(1e30, 1.0), (3e38, 1e-30), (0.0, 1e-30)]:
        out = asag.ops.sinkhorn_attention(q, k, v, lam=lam, tau=tau, iters=5, backend="kernel")
        assert torch.isfinite(out).all()
    big = torch.finfo(torch.float16).max / 2
    out = asag.ops.sinkhorn_attention(q.sign() * big, k.sign() * big, v, lam=5.0, iters=5, backend="kernel")
    assert torch.isfinite(out).all()


def test_cuda_zero_size():
    q, k, v = make_qkv(2, 2, 0, 6, 8, device="cuda")
    assert asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2, backend="kernel").shape == (2, 2, 0, 8)
    q, k, v = make_qkv(2, 2, 5, 0, 8, device="cuda")
    assert (asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2, backend="kernel") == 0).all()


def test_cuda_graph_capture():
    q, k, v = make_qkv(2, 4, 256, 256, 64, device="cuda", seed=6)
    expected = asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=5, backend="kernel")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=5, backend="kernel")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=5, backend="kernel")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_cuda_torch_compile():
    q, k, v = make_qkv(2, 3, 100, 80, 64, device="cuda", seed=7)

    def fn(q, k, v):
        return asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=4) * 2

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)


def test_cuda_deterministic():
    q, k, v = make_qkv(2, 4, 300, 300, 64, device="cuda", seed=8)
    a = asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=6, backend="kernel")
    b = asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=6, backend="kernel")
    assert torch.equal(a, b)


def test_cuda_large_batch_is_chunked_without_oom():
    """640 slices of 4096 tokens: 43 GB of fp32 logits if held at once, more than half of an
    80 GB card's free memory, so the kernel must loop over chunks of slices."""
    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info()
    q, k, v = (torch.randn(10, 64, 4096, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=3, backend="kernel")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 0.6 * free_before, (peak, free_before)
    assert torch.isfinite(out).all()
    for b, h in [(0, 0), (9, 63), (5, 17)]:
        one = asag.ops.sinkhorn_attention(q[b : b + 1, h : h + 1], k[b : b + 1, h : h + 1], v[b : b + 1, h : h + 1], lam=1.0, iters=3, backend="kernel")
        torch.testing.assert_close(out[b : b + 1, h : h + 1], one)
