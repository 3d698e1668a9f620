"""The ops as users call them: bad input, backends, the fallback without the extension,
torch.library.opcheck, torch.compile and gradients."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import asag
from helpers import make_qkv, requires_kernel

q, k, v = make_qkv(2, 3, 10, 12, 16, 8, seed=0)
mask = torch.ones(2, 12, dtype=torch.bool)


def attention(**overrides):
    args = dict(q=q, k=k, v=v, lam=1.0, iters=3)
    args.update(overrides)
    qq, kk, vv = args.pop("q"), args.pop("k"), args.pop("v")
    return asag.ops.sinkhorn_attention(qq, kk, vv, **args)


BAD_ATTENTION = [
    (dict(q=q[0]), ValueError, "q must have shape (B, H, Nq, D)"),
    (dict(k=k[..., 0]), ValueError, "k must have shape (B, H, Nk, D)"),
    (dict(v=v[0]), ValueError, "v must have shape (B, H, Nk, Dv)"),
    (dict(k=make_qkv(2, 3, 10, 12, 17)[1]), ValueError, "k must have shape (B, H, Nk, D) with B, H, D of q"),
    (dict(k=make_qkv(1, 3, 10, 12, 16)[1]), ValueError, "with B, H, D of q"),
    (dict(v=make_qkv(2, 3, 10, 11, 16)[2]), ValueError, "Nk of k"),
    (dict(v=make_qkv(2, 2, 10, 12, 16)[2]), ValueError, "v must have shape"),
    (dict(k=k.double()), ValueError, "k must have the dtype of q"),
    (dict(v=v.half()), ValueError, "v must have the dtype of q"),
    (dict(q=q.int(), k=k.int(), v=v.int()), ValueError, "q must be float16, bfloat16, float32 or float64"),
    (dict(q="q"), TypeError, "q must be a torch.Tensor"),
    (dict(iters=-1), ValueError, "iters must be >= 0"),
    (dict(iters=2.5), TypeError, "iters must be an int"),
    (dict(tau=0.0), ValueError, "tau must be > 0"),
    (dict(tau=-1.0), ValueError, "tau must be > 0"),
    (dict(tau=float("inf")), ValueError, "tau must be finite"),
    (dict(lam=-0.1), ValueError, "lam must be >= 0"),
    (dict(lam=float("nan")), ValueError, "lam must be finite"),
    (dict(lam=float("inf")), ValueError, "lam must be finite"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(key_mask=mask[:, :5]), ValueError, "key_mask must have shape (B, Nk) = (2, 12)"),
    (dict(key_mask=mask.float()), ValueError, "key_mask must be a bool tensor"),
    (dict(key_mask=mask[None]), ValueError, "key_mask must have shape (B, Nk)"),
    (dict(attn_bias=torch.zeros(2, 3, 10, 5)), ValueError, "attn_bias must broadcast to (B, H, Nq, Nk) = (2, 3, 10, 12)"),
    (dict(attn_bias=torch.zeros(2, 3, 10, 12, dtype=torch.int64)), ValueError, "attn_bias must be a float or bool"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("overrides,error,message", BAD_ATTENTION, ids=[m for _, _, m in BAD_ATTENTION])
def test_bad_attention_input_is_named(overrides, error, message, backend):
    overrides.setdefault("backend", backend)
    with pytest.raises(error, match=_escape(message)):
        attention(**overrides)


def _escape(message):
    import re

    return re.escape(message)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: asag.ops.sinkhorn(torch.zeros(5), iters=1), "logits must have shape (..., Nq, Nk)"),
        (lambda: asag.ops.sinkhorn(torch.zeros(2, 5, 4), iters=-2), "iters must be >= 0"),
        (lambda: asag.ops.sinkhorn(torch.zeros(2, 5, 4, dtype=torch.int32), iters=1), "logits must be float16"),
        (lambda: asag.ops.sinkhorn(torch.zeros(2, 5, 4), iters=1, key_mask=torch.ones(3, 4, dtype=torch.bool)), "key_mask must broadcast to (..., Nk) = (2, 4)"),
        (lambda: asag.ops.adversarial_logits(q, k, lam=-1.0), "lam must be >= 0"),
        (lambda: asag.ops.adversarial_logits(q, v, lam=1.0), "k must have shape (B, H, Nk, D)"),
    ],
)
def test_bad_logits_and_sinkhorn_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=_escape(message)):
        call()


@requires_kernel
@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: torch.ops.asag.sinkhorn_attention(q[0], k, v, 1.0, 3, 1.0, 0.25, None, None), "q must have shape"),
        (lambda: torch.ops.asag.sinkhorn_attention(q, k, v, 1.0, -1, 1.0, 0.25, None, None), "iters must be >= 0"),
        (lambda: torch.ops.asag.sinkhorn_attention(q, k, v, -1.0, 3, 1.0, 0.25, None, None), "lam must be finite and >= 0"),
        (lambda: torch.ops.asag.sinkhorn_attention(q, k, v, 1.0, 3, 0.0, 0.25, None, None), "tau must be finite and > 0"),
        (lambda: torch.ops.asag.sinkhorn_attention(q, k.double(), v, 1.0, 3, 1.0, 0.25, None, None), "k must have the dtype of q"),
        (lambda: torch.ops.asag.sinkhorn_attention(q, k, v, 1.0, 3, 1.0, 0.25, mask[:, :3], None), "key_mask must have shape (B, Nk)"),
        (lambda: torch.ops.asag.sinkhorn(torch.zeros(3), 1, None), "logits must have shape"),
        (lambda: torch.ops.asag.adversarial_logits(q, k[:1], 1.0, 1.0, 0.25), "k must have shape"),
    ],
)
def test_direct_op_calls_check_their_arguments(call, message):
    with pytest.raises(RuntimeError, match=_escape(message)):
        call()


@requires_kernel
def test_backends_agree_and_kernel_is_used():
    a = attention(backend="kernel")
    b = attention(backend="torch")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert asag.ops.kernel_unsupported_reasons(torch.device("cpu")) == []


@requires_kernel
def test_unsupported_devices_give_reasons():
    reasons = asag.ops.kernel_unsupported_reasons(torch.device("mps"))
    assert reasons and "mps" in reasons[0]
    if not asag.build_info()["cuda_kernels"]:
        assert "without CUDA kernels" in asag.ops.kernel_unsupported_reasons(torch.device("cuda"))[0]


def test_build_info_reports_what_was_compiled():
    info = asag.build_info()
    for key in ("extension", "cpu_kernels", "cuda_kernels", "torch_runtime", "unavailable_reason"):
        assert key in info
    if info["extension"]:
        assert info["cpu_kernels"] and info["torch_version"] == torch.__version__
        assert info["openmp"]


def test_fallback_when_extension_disabled():
    """ASAG_DISABLE_EXTENSION=1: import works, auto warns once and matches, kernel refuses."""
    script = textwrap.dedent(
        """
        import warnings, torch, asag
        assert not asag.build_info()["extension"]
        assert "ASAG_DISABLE_EXTENSION" in asag.build_info()["unavailable_reason"]
        q = torch.randn(1, 2, 5, 8); k = torch.randn(1, 2, 6, 8); v = torch.randn(1, 2, 6, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=3)
            asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=3)
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert "ASAG_DISABLE_EXTENSION=1" in str(caught[0].message)
        b = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=3, backend="torch")
        assert torch.equal(a, b)
        try:
            asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=3, backend="kernel")
        except RuntimeError as e:
            assert "backend='kernel') cannot run" in str(e) and "ASAG_DISABLE_EXTENSION" in str(e)
        else:
            raise AssertionError("backend='kernel' should have raised")
        f = torch.compile(lambda q, k, v: asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2), fullgraph=True)
        torch.testing.assert_close(f(q, k, v), asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2))
        print("fallback ok")
        """
    )
    env = dict(os.environ, ASAG_DISABLE_EXTENSION="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fallback ok" in done.stdout


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_opcheck(dtype):
    qq, kk, vv = make_qkv(2, 2, 6, 7, 8, 5, dtype=dtype, seed=1)
    key_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    bias = torch.randn(1, 2, 6, 7, dtype=dtype)
    cases = [
        (torch.ops.asag.sinkhorn_attention.default, (qq, kk, vv, 1.0, 3, 1.0, 0.3, None, None)),
        (torch.ops.asag.sinkhorn_attention.default, (qq, kk, vv, 2.0, 2, 0.5, 0.3, key_mask, bias)),
        (torch.ops.asag.adversarial_logits.default, (qq, kk, 1.5, 1.0, 0.3)),
        (torch.ops.asag.sinkhorn.default, (torch.randn(2, 3, 6, 7, dtype=dtype), 4, None)),
        (torch.ops.asag.sinkhorn.default, (torch.randn(2, 6, 7, dtype=dtype), 4, key_mask)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@requires_kernel
def test_opcheck_with_gradients():
    qq, kk, vv = make_qkv(1, 2, 5, 6, 4, dtype=torch.float64, seed=2)
    for t in (qq, kk, vv):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.asag.sinkhorn_attention.default, (qq, kk, vv, 1.0, 2, 1.0, 0.5, None, None))


@requires_kernel
def test_torch_compile_fullgraph():
    def fn(q, k, v, logits):
        out = asag.ops.sinkhorn_attention(q, k, v, lam=2.0, iters=4, key_mask=mask)
        m = asag.ops.adversarial_logits(q, k, lam=2.0)
        plan = asag.ops.sinkhorn(logits, iters=3)
        return out * 2 + 1, m.sum(-1), plan

    logits = torch.randn(2, 3, 10, 12)
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(q, k, v, logits), fn(q, k, v, logits)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    q2, k2, v2 = make_qkv(2, 3, 17, 12, 16, 8, seed=3)  # a new Nq: recompiles or runs dynamic
    torch.testing.assert_close(compiled(q2, k2, v2, logits)[0], fn(q2, k2, v2, logits)[0], atol=1e-5, rtol=1e-5)


@requires_kernel
def test_gradients_flow_through_the_kernel_op():
    qq, kk, vv = make_qkv(1, 2, 6, 5, 4, dtype=torch.float64, seed=4)
    bias = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    inputs = [t.requires_grad_(True) for t in (qq, kk, vv)]

    def fn(q, k, v, b):
        return asag.ops.sinkhorn_attention(q, k, v, lam=1.5, iters=3, attn_bias=b, backend="kernel")

    assert torch.autograd.gradcheck(fn, (*inputs, bias))
    logits = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: asag.ops.sinkhorn(x, iters=3, backend="kernel"), (logits,))
    assert torch.autograd.gradcheck(lambda a, b: asag.ops.adversarial_logits(a, b, lam=2.0, backend="kernel"), (qq, kk))


def test_compiled_archs_decide_where_cuda_kernels_run():
    from asag.ops._backend import arch_runs

    spec = "8.0;9.0+PTX"
    assert arch_runs(spec, (8, 0)) and arch_runs(spec, (8, 6)) and arch_runs(spec, (9, 0)) and arch_runs(spec, (10, 0))
    assert not arch_runs(spec, (7, 5))  # a T4: no SASS for 7.x and the PTX is newer than the card
    assert not arch_runs("8.0;9.0", (10, 0))  # no PTX to JIT for a newer card


def test_meta_tensors_mixed_with_real_ones_are_refused():
    q, k, v = make_qkv(1, 2, 5, 6, 8)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        torch.ops.asag.sinkhorn_attention(q, k.to("meta"), v, 1.0, 2, 1.0, 0.3, None, None)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        torch.ops.asag.adversarial_logits(q.to("meta"), k, 1.0, 1.0, 0.3)


@pytest.mark.parametrize("call", [
    lambda x: torch.ops.asag.sinkhorn(x, 2, None),
    lambda x: torch.ops.asag.adversarial_logits(x, x, 1.0, 1.0, 0.3),
])
def test_float8_is_refused(call):
    x = torch.randn(1, 1, 4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        call(x)


def test_iterations_are_bounded():
    q, k, v = make_qkv(1, 1, 3, 3, 4)
    with pytest.raises(ValueError, match="iters must be at most 10000"):
        asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2**63)
    with pytest.raises(RuntimeError, match="iters must be at most 10000"):
        torch.ops.asag.sinkhorn_attention(q, k, v, 1.0, 10001, 1.0, 0.5, None, None)


def test_sinkhorn_mask_has_one_meaning():
    logits = torch.randn(3, 3, 4, 5)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    for call in (lambda m: asag.ops.sinkhorn(logits, iters=2, key_mask=m), lambda m: torch.ops.asag.sinkhorn(logits, 2, m)):
        with pytest.raises((ValueError, RuntimeError), match=r"key_mask must broadcast to \(\.\.\., Nk\)"):
            call(mask)  # (B, Nk) for (B, H, Nq, Nk) logits: per batch or per head? Refused.
    per_batch = mask[:, None, :]
    kernel = torch.ops.asag.sinkhorn(logits, 2, per_batch)
    torch.testing.assert_close(kernel, asag.ops.sinkhorn(logits, iters=2, key_mask=per_batch, backend="torch"))
    assert (kernel[1, :, :, ~mask[1]] == 0).all()  # batch 1's masked keys, in every head


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_non_finite_logits_give_a_finite_plan(backend):
    logits = torch.randn(2, 4, 6)
    logits[0, 1, 2] = float("inf")
    logits[0, 2, :] = float("nan")
    logits[1, 3, 1] = float("-inf")
    plan = asag.ops.sinkhorn(logits, iters=3, backend=backend)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-1), torch.ones(2, 4))
    assert plan[0, 1, 2] == 1.0 and plan[1, 3, 1] == 0.0  # +inf takes the row's mass, -inf none
    clean = asag.ops.sinkhorn(logits[1:], iters=3, backend=backend)  # batch 1 only has a -inf
    other = asag.ops.sinkhorn(logits[1:], iters=3, backend="torch" if backend == "kernel" else "kernel")
    torch.testing.assert_close(clean, other)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_gradients_stay_finite_with_masks_and_empty_rows(backend):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 5, 6, 8, seed=3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1] = False  # a batch row with no valid key
    allowed = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed[..., 0, :] = False  # a query that may attend nothing
    for extra in (dict(key_mask=mask), dict(attn_bias=allowed)):
        out = asag.ops.sinkhorn_attention(q, k, v, lam=1.5, iters=3, backend=backend, **extra)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads), extra


def test_double_backward_matches_the_reference():
    q, k, v = (t.double().requires_grad_() for t in make_qkv(1, 2, 4, 5, 6, seed=4))

    def second(backend):
        out = asag.ops.sinkhorn_attention(q, k, v, lam=1.0, iters=2, backend=backend)
        (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        return torch.autograd.grad(gq.sum(), (q, k, v))

    for a, b in zip(second("kernel"), second("torch")):
        torch.testing.assert_close(a, b)
