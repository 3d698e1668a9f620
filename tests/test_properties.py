"""Properties that a shared mistake of kernel and reference would still break: rows sum to 1,
columns converge as iters grows, the limits are softmax / SDPA, no NaN or Inf ever."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import asag
from helpers import ALL_DTYPES, make_qkv, random_key_mask, requires_kernel

BACKENDS = [pytest.param("kernel", marks=requires_kernel), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_rows_sum_to_one(backend, dtype):
    logits = torch.randn(2, 3, 64, 40, generator=torch.Generator().manual_seed(0)) * 3
    plan = asag.ops.sinkhorn(logits.to(dtype), iters=5, backend=backend)
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(plan.sum(-1).double(), torch.ones(2, 3, 64).double(), atol=tol, rtol=0)
    assert (plan >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("std", [1.0, 3.0])
def test_column_error_falls_as_iters_grows(backend, std):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 96, 64, generator=g) * std
    target = 96 / 64
    errors = []
    for iters in [0, 1, 2, 4, 8, 16, 32]:
        plan = asag.ops.sinkhorn(logits, iters=iters, backend=backend)
        errors.append((plan.sum(-2) - target).abs().max().item())
    assert all(b <= a * 1.0001 + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 10, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_keys_get_no_mass_and_columns_target_valid_count(backend):
    logits = torch.randn(2, 30, 20, generator=torch.Generator().manual_seed(2))
    mask = random_key_mask(2, 20, seed=3)
    plan = asag.ops.sinkhorn(logits, iters=200, key_mask=mask, backend=backend)
    assert (plan.masked_select(~mask[:, None, :].expand_as(plan)) == 0).all()
    col = plan.sum(-2)
    for b in range(2):
        target = 30 / mask[b].sum().item()
        torch.testing.assert_close(col[b][mask[b]], torch.full_like(col[b][mask[b]], target), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_iters0_lam0_is_sdpa(backend, dtype):
    q, k, v = make_qkv(2, 4, 77, 53, 64, 48, dtype=dtype, seed=5)
    out = asag.ops.sinkhorn_attention(q, k, v, lam=0.0, iters=0, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    bias = torch.randn(2, 1, 77, 53, dtype=dtype)
    out = asag.ops.sinkhorn_attention(q, k, v, lam=0.0, iters=0, attn_bias=bias, scale=0.3, backend=backend)
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_iters0_is_softmax_of_adversarial_logits(backend):
    q, k, v = make_qkv(1, 2, 31, 17, 40, seed=6)
    logits = asag.ops.adversarial_logits(q, k, lam=2.5, tau=0.8, backend=backend)
    expected = torch.softmax(logits, -1) @ v
    out = asag.ops.sinkhorn_attention(q, k, v, lam=2.5, tau=0.8, iters=0, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_cost_lowers_attention_to_similar_keys(backend):
    """lam > 0 moves mass away from the keys most similar to each query."""
    q, k, _ = make_qkv(1, 1, 64, 64, 32, seed=7)
    k = q + 0.1 * k  # key j is a near copy of query j: the diagonal is the most similar pair
    v = torch.eye(64)[None, None]
    plain = asag.ops.sinkhorn_attention(q, k, v, lam=0.0, iters=3, backend=backend)
    adv = asag.ops.sinkhorn_attention(q, k, v, lam=3.0, iters=3, backend=backend)
    assert adv[0, 0].diagonal().mean() < plain[0, 0].diagonal().mean() * 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_with_every_key_masked_returns_zeros(backend):
    q, k, v = make_qkv(2, 2, 5, 6, 16, seed=8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    out = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=3, key_mask=mask, backend=backend)
    assert (out[1] == 0).all() and out[0].abs().sum() > 0
    bias = torch.zeros(2, 2, 5, 6)
    bias[0, 1, 2] = -math.inf  # one query of one head sees no key
    out = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=3, attn_bias=bias, backend=backend)
    assert (out[0, 1, 2] == 0).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape", [(0, 2, 5, 6, 8, 8), (2, 0, 5, 6, 8, 8), (2, 2, 0, 6, 8, 8), (2, 2, 5, 0, 8, 8), (2, 2, 5, 6, 0, 8), (2, 2, 5, 6, 8, 0)]
)
def test_zero_size_inputs(backend, shape):
    q, k, v = make_qkv(*shape, seed=0)
    out = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2, backend=backend)
    assert out.shape == (shape[0], shape[1], shape[2], shape[5])
    assert torch.isfinite(out).all()
    if shape[3] == 0:
        assert (out == 0).all()
    m = asag.ops.adversarial_logits(q, k, lam=1.0, backend=backend)
    assert m.shape == (shape[0], shape[1], shape[2], shape[3])
    assert asag.ops.sinkhorn(m, iters=2, backend=backend).shape == m.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        dict(lam=1e30, tau=1.0),
        dict(lam=3e38, tau=1e-30),
        dict(lam=0.0, tau=1e-30),
        dict(lam=1.0, tau=1e30),
    ],
    ids=["huge-lam", "max-lam-tiny-tau", "tiny-tau", "huge-tau"],
)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_extreme_parameters_stay_finite(backend, case, dtype):
    q, k, v = make_qkv(1, 2, 19, 23, 32, dtype=dtype, seed=9)
    out = asag.ops.sinkhorn_attention(q, k, v, iters=5, backend=backend, **case)
    assert torch.isfinite(out).all()
    plan = asag.ops.sinkhorn(asag.ops.adversarial_logits(q, k, backend=backend, **case), iters=5, backend=backend)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-1), torch.ones_like(plan.sum(-1)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_near_their_max_stay_finite(backend, dtype):
    big = torch.finfo(dtype).max / 2
    q, k, v = make_qkv(1, 2, 16, 24, 64, dtype=dtype, seed=10)
    q = (q.float().sign() * big).to(dtype)
    k = (k.float().sign() * big).to(dtype)
    v = (v.float().clamp(-1, 1) * big).to(dtype)
    for lam in (0.0, 5.0, 1e20):
        out = asag.ops.sinkhorn_attention(q, k, v, lam=lam, iters=6, backend=backend)
        assert torch.isfinite(out).all(), lam


def test_tiny_and_zero_vectors_stay_finite():
    q, k, v = make_qkv(1, 1, 12, 12, 16, seed=11)
    q[0, 0, :4] = 0.0
    k[0, 0, :3] = 1e-30
    for backend in ["torch"] + (["kernel"] if asag.build_info()["extension"] else []):
        out = asag.ops.sinkhorn_attention(q, k, v, lam=1e30, iters=4, backend=backend)
        assert torch.isfinite(out).all()


@requires_kernel
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    nq=st.integers(1, 40),
    nk=st.integers(1, 40),
    d=st.integers(1, 48),
    lam=st.floats(0, 50),
    iters=st.integers(0, 12),
    log_std=st.floats(-3, 2),
    seed=st.integers(0, 2**16),
)
def test_kernel_plan_properties_hypothesis(nq, nk, d, lam, iters, log_std, seed):
    q, k, v = make_qkv(1, 2, nq, nk, d, seed=seed, std=10**log_std)
    logits = asag.ops.adversarial_logits(q, k, lam=lam, backend="kernel")
    plan = asag.ops.sinkhorn(logits, iters=iters, backend="kernel")
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-1), torch.ones(1, 2, nq), atol=1e-5, rtol=0)
    ref = asag.ops.sinkhorn(logits.double(), iters=iters, backend="torch")
    # fp32 sums M + f + g lose eps * |M| absolutely; exp carries that into the plan
    tol = 1e-4 + 8 * torch.finfo(torch.float32).eps * logits.abs().max().item()
    assert (plan.double() - ref).abs().max() <= tol
