"""Pure-PyTorch reference of the asag ops (docs/method.md section 1).

This is the definition the kernels are tested against, and the fallback that
``backend="auto"`` uses where no kernel can serve a call. It is written for clarity, in the
plain log domain (one ``logsumexp`` per half-iteration), not for speed: it materialises
several ``Nq x Nk`` temporaries.

All arithmetic runs in float32 (float64 for float64 input) unless ``compute_dtype`` says
otherwise; tests use ``compute_dtype=torch.float16`` to get "the same maths run by PyTorch in
half precision" as an error yardstick.
"""

import math
from typing import Optional

import torch

NORM_FLOOR = 1e-6


def logit_max(dtype: torch.dtype) -> float:
    """Finite logits are clamped to +-this (csrc/include/asag/sinkhorn_math.h says why)."""
    return 1e300 if dtype == torch.float64 else min(1e30, torch.finfo(dtype).max)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths runs in for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clamp_logits(m: torch.Tensor) -> torch.Tensor:
    """Clamps finite logits to +-LOGIT_MAX, keeps -inf (masked), maps NaN to -LOGIT_MAX."""
    hi = logit_max(m.dtype)
    clamped = torch.nan_to_num(m, nan=-hi, posinf=hi, neginf=-hi).clamp(-hi, hi)
    return torch.where(m == -math.inf, m, clamped)


def bias_to_additive(attn_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend, as in SDPA) becomes 0 / -inf; a float bias is cast."""
    if attn_bias.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attn_bias.device)
        return torch.where(attn_bias, zero, -math.inf)
    return attn_bias.to(dtype)


def adversarial_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    lam: float,
    tau: float = 1.0,
    scale: float,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``M = (scale * q k^T - lam * cos(q, k)) / tau``, in the accumulation dtype."""
    acc = compute_dtype or accumulation_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    dots = q @ k.transpose(-1, -2)
    rq = 1.0 / torch.linalg.vector_norm(q, dim=-1).clamp_min(NORM_FLOOR)
    rk = 1.0 / torch.linalg.vector_norm(k, dim=-1).clamp_min(NORM_FLOOR)
    cosine = dots * rq[..., :, None] * rk[..., None, :]
    return clamp_logits((scale * dots - lam * cosine) / tau)


def sinkhorn(
    logits: torch.Tensor,
    *,
    iters: int,
    key_mask: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Log-domain Sinkhorn plan for logits ``(..., Nq, Nk)``; output in the logits' dtype.

    Rows sum to 1 (the last step is a row step); columns converge to ``Nq / Nk_valid``.
    ``key_mask`` (bool, broadcastable to ``(..., Nk)``, True = valid) removes keys from both
    marginals. Rows with no reachable key are all zero.
    """
    acc = compute_dtype or accumulation_dtype(logits.dtype)
    m = logits.to(acc)
    nq, nk = m.shape[-2], m.shape[-1]
    if key_mask is not None:
        valid = key_mask.expand(*m.shape[:-2], nk)
        m = m.masked_fill(~valid[..., None, :], -math.inf)
        n_valid = valid.sum(-1, keepdim=True).unsqueeze(-2).to(acc)  # (..., 1, 1)
    else:
        n_valid = torch.full((), float(nk), dtype=acc, device=m.device)
    log_marginal = torch.log(nq / n_valid)
    g = torch.zeros(*m.shape[:-2], 1, nk, dtype=acc, device=m.device)
    for _ in range(iters):
        f = -torch.logsumexp(m + g, dim=-1, keepdim=True)
        f = torch.where(torch.isfinite(f), f, torch.zeros_like(f))  # rows with no key
        col_lse = torch.logsumexp(m + f, dim=-2, keepdim=True)
        # Columns no query reaches (masked or -inf throughout) keep their potential.
        g = torch.where(torch.isfinite(col_lse), log_marginal - col_lse, g)
    plan = torch.softmax(m + g, dim=-1)
    plan = torch.nan_to_num(plan, nan=0.0)  # softmax of an all -inf row
    return plan.to(logits.dtype)


def sinkhorn_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lam: float,
    iters: int,
    tau: float = 1.0,
    scale: float,
    key_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``out = Sinkhorn(M + bias) @ v`` for ``q (B,H,Nq,D)``, ``k (B,H,Nk,D)``, ``v (B,H,Nk,Dv)``."""
    acc = compute_dtype or accumulation_dtype(q.dtype)
    m = adversarial_logits(q, k, lam=lam, tau=tau, scale=scale, compute_dtype=acc)
    if attn_bias is not None:
        m = clamp_logits(m + bias_to_additive(attn_bias, acc))
    mask = key_mask[:, None, :] if key_mask is not None else None
    plan = sinkhorn(m, iters=iters, key_mask=mask, compute_dtype=acc)
    return (plan @ v.to(acc)).to(q.dtype)
