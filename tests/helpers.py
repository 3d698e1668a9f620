"""Shared test helpers: seeded inputs, the float64 reference, error yardsticks."""

import pytest
import torch

import asag
from asag.ops import reference

requires_kernel = pytest.mark.skipif(
    not asag.build_info()["extension"],
    reason=f"asag._C not available: {asag.build_info()['unavailable_reason']}",
)

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# (B, H, Nq, Nk, D, Dv): awkward N (1, 7, 97, 1025), head dims 40, 64, 72, 128, Nq != Nk.
AWKWARD_SHAPES = [
    (1, 1, 1, 1, 40, 40),
    (2, 3, 7, 7, 64, 64),
    (1, 2, 97, 7, 72, 40),
    (2, 1, 7, 97, 128, 72),
    (1, 2, 97, 97, 40, 64),
    (1, 1, 1025, 97, 64, 64),
    (1, 1, 97, 1025, 72, 128),
    (1, 1, 1, 1025, 64, 16),
]
PARAMS = [dict(lam=0.0, iters=0), dict(lam=1.5, iters=3), dict(lam=4.0, iters=10, tau=0.7)]


def shape_id(shape):
    return "x".join(map(str, shape))


def params_id(params):
    return f"lam{params['lam']}-it{params['iters']}"


def make_qkv(b, h, nq, nk, d, dv=None, dtype=torch.float32, seed=0, std=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, h, nq, d, generator=g) * std
    k = torch.randn(b, h, nk, d, generator=g) * std
    v = torch.randn(b, h, nk, dv, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def random_key_mask(b, nk, seed=0, p_valid=0.7):
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, nk, generator=g) < p_valid
    mask[:, 0] = True  # keep one valid key per row unless a test wants none
    return mask


def reference64(q, k, v, **kw):
    """The float64 evaluation of docs/method.md section 1: the ground truth."""
    bias = kw.pop("attn_bias", None)
    if bias is not None and bias.dtype != torch.bool:
        bias = bias.double()
    return reference.sinkhorn_attention(
        q.double(), k.double(), v.double(), attn_bias=bias, **kw
    )


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()
