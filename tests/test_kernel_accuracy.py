"""The CPU kernel against the PyTorch reference and float64, on seeded random shapes,
awkward sizes, Nq != Nk, masks, biases and every dtype."""

import pytest
import torch

import asag
from asag.ops import reference
from helpers import (
    ALL_DTYPES,
    AWKWARD_SHAPES,
    HALF_DTYPES,
    PARAMS,
    make_qkv,
    params_id,
    max_err,
    random_key_mask,
    reference64,
    requires_kernel,
    shape_id,
)

pytestmark = requires_kernel

def _scale(q):
    return q.shape[-1] ** -0.5


# Inputs peaked enough (std 2.5) that every Sinkhorn iteration still moves the result: one
# iteration fewer changes it by 1e-2 to 4e-1 of its size, far beyond the tolerances below.
STD = 2.5


def _fp_tolerance(dtype, ref):
    """What the arithmetic achieves against float64: float32 kernels land within 3.5e-6 of
    the output's size on these shapes (measured), float64 within round-off."""
    rel = 8e-6 if dtype == torch.float32 else 1e-12
    return rel * ref.abs().max().item()


@pytest.mark.parametrize("shape", AWKWARD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("params", PARAMS, ids=params_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_matches_float64(shape, params, dtype):
    q, k, v = make_qkv(*shape, dtype=dtype, seed=sum(shape), std=STD)
    out = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params)
    ref = reference64(q, k, v, scale=_scale(q), **params)
    assert out.dtype == dtype and out.shape == ref.shape
    assert max_err(out, ref) <= _fp_tolerance(dtype, ref)
    torch_ref = asag.ops.sinkhorn_attention(q, k, v, backend="torch", **params)
    assert max_err(torch_ref, ref) <= _fp_tolerance(dtype, ref)
    if params["iters"] and shape[2] > 1:  # the test can fail: one iteration fewer would
        fewer = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **dict(params, iters=params["iters"] - 1))
        assert max_err(fewer, ref) > 100 * _fp_tolerance(torch.float32, ref)


@pytest.mark.parametrize("shape", AWKWARD_SHAPES[:6], ids=shape_id)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_error_at_most_twice_pytorch(shape, dtype):
    """Kernel error vs float64 <= 2x the error of the same maths run by PyTorch in that
    dtype end to end, and <= 2x the error of the fp32-accumulating reference (+ 1 ulp)."""
    params = dict(lam=2.0, iters=5)
    q, k, v = make_qkv(*shape, dtype=dtype, seed=7 + sum(shape))
    ref = reference64(q, k, v, scale=_scale(q), **params)
    out = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params)
    assert out.dtype == dtype
    in_dtype = reference.sinkhorn_attention(q, k, v, scale=_scale(q), compute_dtype=dtype, **params)
    fp32_acc = asag.ops.sinkhorn_attention(q, k, v, backend="torch", **params)
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert max_err(out, ref) <= 2 * max_err(in_dtype, ref) + 1e-6
    assert max_err(out, ref) <= 2 * max_err(fp32_acc, ref) + ulp


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("bias_shape", [None, (2, 3, 33, 45), (1, 3, 1, 45), (33, 45), (45,)])
def test_masks_and_biases(dtype, bias_shape):
    b, h, nq, nk, d = 2, 3, 33, 45, 64
    q, k, v = make_qkv(b, h, nq, nk, d, dtype=dtype, seed=3, std=STD)
    key_mask = random_key_mask(b, nk)
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    params = dict(lam=1.0, iters=6, key_mask=key_mask, attn_bias=bias)
    out = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params)
    ref = reference64(q, k, v, scale=_scale(q), **params)
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, _fp_tolerance(dtype, ref))
    assert max_err(out, ref) <= tol


def test_bool_attn_bias_means_attend():
    q, k, v = make_qkv(2, 2, 9, 11, 40, seed=4)
    allowed = torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(2)) > 0.4
    allowed[..., 0] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    a = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=4, attn_bias=allowed, backend="kernel")
    b = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=4, attn_bias=additive, backend="kernel")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_inputs():
    # (B, N, H, D) storage seen as (B, H, N, D), as attention layers produce it.
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 50, 4, 64, generator=g).transpose(1, 2)
    k = torch.randn(2, 60, 4, 64, generator=g).transpose(1, 2)
    v = torch.randn(2, 60, 4, 32, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    out = asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=4, backend="kernel")
    ref = reference64(q, k, v, lam=2.0, iters=4, scale=64**-0.5)
    assert max_err(out, ref) <= _fp_tolerance(torch.float32, ref)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_adversarial_logits_match_reference(dtype):
    q, k, _ = make_qkv(2, 2, 37, 29, 72, dtype=dtype, seed=9)
    m = asag.ops.adversarial_logits(q, k, lam=3.0, tau=0.5, backend="kernel")
    ref = reference.adversarial_logits(q.double(), k.double(), lam=3.0, tau=0.5, scale=72**-0.5)
    assert m.dtype == reference.accumulation_dtype(dtype) and m.shape == (2, 2, 37, 29)
    tol = 1e-12 if dtype == torch.float64 else 2e-6 * ref.abs().max().item()
    assert max_err(m, ref) <= tol


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=str)
def test_sinkhorn_matches_reference(dtype, lead):
    g = torch.Generator().manual_seed(len(lead))
    logits = (torch.randn(*lead, 41, 23, generator=g) * 2).to(dtype)
    mask = torch.rand(*lead, 23, generator=g) > 0.3 if lead else None
    plan = asag.ops.sinkhorn(logits, iters=8, key_mask=mask, backend="kernel")
    ref = reference.sinkhorn(logits.double(), iters=8, key_mask=mask)
    assert plan.dtype == dtype and plan.shape == logits.shape
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-6}.get(dtype, 1e-12)
    assert max_err(plan, ref) <= tol


def test_random_sweep_against_float64():
    """Seeded random shapes and parameters, fp32."""
    gen = torch.Generator().manual_seed(1234)
    for trial in range(12):
        b, h = (int(x) for x in torch.randint(1, 3, (2,), generator=gen))
        nq, nk = (int(x) for x in torch.randint(1, 150, (2,), generator=gen))
        d, dv = (int(x) for x in torch.randint(1, 96, (2,), generator=gen))
        lam = float(torch.rand((), generator=gen)) * 6
        iters = int(torch.randint(0, 12, (), generator=gen))
        tau = 0.25 + float(torch.rand((), generator=gen)) * 2
        std = 1.5 + float(torch.rand((), generator=gen)) * 2
        q, k, v = make_qkv(b, h, nq, nk, d, dv, seed=trial, std=std)
        mask = random_key_mask(b, nk, seed=trial) if trial % 2 else None
        params = dict(lam=lam, iters=iters, tau=tau, key_mask=mask)
        out = asag.ops.sinkhorn_attention(q, k, v, backend="kernel", **params)
        ref = reference64(q, k, v, scale=d**-0.5, **params)
        assert max_err(out, ref) <= _fp_tolerance(torch.float32, ref), params
