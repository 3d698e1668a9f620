"""The public ops: typed, validated wrappers that route each call to the compiled kernel
(``torch.ops.asag.*``) or to the PyTorch reference (``asag.ops.reference``)."""

from typing import Optional

import torch

from .. import _environment, _extension
from . import _checks, reference
from ._backend import use_kernel

if _extension.available():
    from . import _registration  # noqa: F401  (fake kernels and autograd of the compiled ops)


def _default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    if scale is not None:
        return float(scale)
    d = q.shape[-1]
    return d**-0.5 if d > 0 else 1.0


def sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lam: float,
    iters: int,
    tau: float = 1.0,
    scale: Optional[float] = None,
    key_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    path: str = "auto",
) -> torch.Tensor:
    """Adversarial Sinkhorn attention (docs/method.md section 1).

    ``M = (scale * q k^T - lam * cos(q, k)) / tau + attn_bias``; the plan ``P`` is ``iters``
    log-domain Sinkhorn iterations on ``M`` (rows sum to 1, columns tend to ``Nq / Nk``);
    the output is ``P v``. ``iters=0`` is softmax attention over ``M``; ``lam=0, iters=0``
    is ``scaled_dot_product_attention``.

    Args:
        q: ``(B, H, Nq, D)``. k: ``(B, H, Nk, D)``. v: ``(B, H, Nk, Dv)``. One float dtype
            (float16, bfloat16, float32, float64) and one device for all three.
        lam: adversarial strength, ``>= 0``. Typical guidance values: 0.5 to 5.
        iters: Sinkhorn iterations, ``>= 0``; typical 3 to 10.
        tau: temperature ``> 0`` dividing the logits.
        scale: logit scale, default ``D ** -0.5``.
        key_mask: ``(B, Nk)`` bool, True = valid key. Masked keys count in neither marginal;
            a batch row with no valid key outputs zeros.
        attn_bias: additive float bias broadcastable to ``(B, H, Nq, Nk)``, or a bool mask
            (True = attend, as in SDPA) that becomes ``0 / -inf``.
        backend: ``"auto"`` (kernel if it can serve the call, else the reference, with a
            one-time warning naming why), ``"kernel"`` (error if it cannot) or ``"torch"``.
        path: ``"materialized"`` (one float32 ``Nq x Nk`` logits block per slice in flight:
            fastest while it fits), ``"streaming"`` (no such block: logits recomputed a block
            of rows at a time in every sweep, memory linear in ``Nq + Nk``) or ``"auto"``:
            streaming when one slice's block would exceed ``ASAG_MATERIALIZED_BYTES``
            (default 512 MiB). Both compute the same maths, to float32 round-off.

    Returns:
        ``(B, H, Nq, Dv)`` in the dtype of ``q``. Arithmetic is float32 (float64 for float64).
    """
    _checks.check_attention(q, k, v, key_mask, attn_bias)
    _checks.check_scalars(lam=lam, iters=iters, tau=tau, scale=scale)
    streaming = choose_path(path, q.shape[2], k.shape[2]) == "streaming"
    scale = _default_scale(q, scale)
    if use_kernel(backend, q.device, "sinkhorn_attention", streaming=streaming):
        op = torch.ops.asag.sinkhorn_attention_streaming if streaming else torch.ops.asag.sinkhorn_attention
        return op(q, k, v, float(lam), int(iters), float(tau), scale, key_mask, attn_bias)
    fn = reference.sinkhorn_attention_streaming if streaming else reference.sinkhorn_attention
    return fn(q, k, v, lam=lam, iters=iters, tau=tau, scale=scale, key_mask=key_mask, attn_bias=attn_bias)


PATHS = ("auto", "materialized", "streaming")


def choose_path(path: str, nq: int, nk: int) -> str:
    """"materialized" or "streaming" for a call with these token counts (see
    sinkhorn_attention's ``path``)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    return "streaming" if 4 * nq * nk > _environment.MATERIALIZED_BYTES else "materialized"


def adversarial_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    lam: float,
    tau: float = 1.0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The logits ``M = (scale * q k^T - lam * cos(q, k)) / tau`` of Sinkhorn attention.

    ``q (B, H, Nq, D)``, ``k (B, H, Nk, D)`` -> ``(B, H, Nq, Nk)`` in float32 (float64 for
    float64 inputs): logits are what Sinkhorn needs in full precision (docs/method.md section 5).
    ``cos(q_i, k_j) = <q_i, k_j> / (max(|q_i|, 1e-6) max(|k_j|, 1e-6))``. Finite logits are
    clamped to ``+-1e30`` so no later sum overflows.
    """
    _checks.check_qk(q, k)
    _checks.check_scalars(lam=lam, tau=tau, scale=scale)
    scale = _default_scale(q, scale)
    if use_kernel(backend, q.device, "adversarial_logits"):
        return torch.ops.asag.adversarial_logits(q, k, float(lam), float(tau), scale)
    return reference.adversarial_logits(q, k, lam=lam, tau=tau, scale=scale)


def sinkhorn(
    logits: torch.Tensor,
    *,
    iters: int,
    key_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Batched log-domain Sinkhorn scaling: the transport plan of ``logits (..., Nq, Nk)``.

    Starts from ``g = 0``, ``f = -LSE_j(M)`` and runs ``iters`` column-then-row steps, so the
    rows of the plan sum to 1 exactly and the columns tend to ``Nq / Nk_valid``.
    ``key_mask`` is bool with the logits' leading dims (each may be 1) and ``Nk``, True =
    valid key: for ``(B, H, Nq, Nk)`` logits, ``(B, H, Nk)`` or ``(B, 1, Nk)``
    (``key_mask[:, None, :]`` of the ``(B, Nk)`` mask ``sinkhorn_attention`` takes). Masked
    keys get zero mass. Logits are clamped as the attention op's are: NaN to ``-1e30`` (never
    chosen), ``+inf`` to ``1e30``; ``-inf`` stays a masked entry. Returns the plan in the dtype of ``logits``
    (computed in float32, or float64).
    """
    _checks.check_sinkhorn(logits, key_mask)
    _checks.check_scalars(iters=iters)
    if use_kernel(backend, logits.device, "sinkhorn"):
        return torch.ops.asag.sinkhorn(logits, int(iters), key_mask)
    return reference.sinkhorn(logits, iters=iters, key_mask=key_mask)
