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


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp along dim (kept), -inf where every entry is -inf, with gradients that stay
    finite there (torch.logsumexp's are NaN for such rows, and so would every gradient be)."""
    if x.shape[dim] == 0:  # an empty reduction: nothing reachable
        shape = list(x.shape)
        shape[dim] = 1
        return x.new_full(shape, -math.inf)
    top = x.detach().amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(x - top).sum(dim, keepdim=True)
    empty = total == 0
    out = torch.log(torch.where(empty, torch.ones_like(total), total)) + top
    return torch.where(empty, torch.full_like(out, -math.inf), out)


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax along dim, all zero where every entry is -inf, with finite gradients."""
    top = x.detach().amax(dim, keepdim=True) if x.shape[dim] else x.new_zeros(())
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(x - top)
    total = e.sum(dim, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def _potential(x: torch.Tensor, dim: int) -> torch.Tensor:
    """-LSE along dim, and 0 where nothing is reachable (a row or column of -inf)."""
    lse = _lse(x, dim)
    return torch.where(torch.isfinite(lse), -lse, torch.zeros_like(lse))


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
    # max(|x|, floor) as sqrt(max(|x|^2, floor^2)): the same value, and a zero gradient (not
    # NaN) for vectors under the floor.
    rq = torch.rsqrt((q * q).sum(-1).clamp_min(NORM_FLOOR**2))
    rk = torch.rsqrt((k * k).sum(-1).clamp_min(NORM_FLOOR**2))
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
    m = clamp_logits(logits.to(acc))
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
        f = _potential(m + g, dim=-1)  # 0 for rows with no key
        col_lse = _lse(m + f, dim=-2)
        # Columns no query reaches (masked or -inf throughout) keep their potential.
        g = torch.where(torch.isfinite(col_lse), log_marginal - col_lse, g)
    plan = _softmax(m + g, dim=-1)  # rows with no key: all zero
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


def _bias_block(bias: Optional[torch.Tensor], rows: slice, cols: slice) -> Optional[torch.Tensor]:
    """The (rows, cols) block of a bias broadcastable to (B, H, Nq, Nk)."""
    if bias is None:
        return None
    if bias.dim() >= 2 and bias.shape[-2] != 1:
        bias = bias[..., rows, :]
    if bias.shape[-1] != 1:
        bias = bias[..., cols]
    return bias


def sinkhorn_attention_streaming(
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
    block_elements: int = 1 << 24,
) -> torch.Tensor:
    """:func:`sinkhorn_attention` without its ``Nq x Nk`` matrix: the logits are recomputed
    for a block of rows (row steps, the output) or of columns (column steps) at a time, at most
    ``block_elements`` of them; the same maths, in the plain log domain."""
    acc = compute_dtype or accumulation_dtype(q.dtype)
    q_dtype = q.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    nq, nk = q.shape[-2], k.shape[-2]
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    if out.numel() == 0 or nk == 0:
        return out.to(q_dtype)
    rq = torch.rsqrt((q * q).sum(-1, keepdim=True).clamp_min(NORM_FLOOR**2))
    rk = torch.rsqrt((k * k).sum(-1, keepdim=True).clamp_min(NORM_FLOOR**2))
    bias = bias_to_additive(attn_bias, acc) if attn_bias is not None else None
    valid = key_mask[:, None, None, :] if key_mask is not None else None

    def logits(rows: slice, cols: slice) -> torch.Tensor:
        dots = q[..., rows, :] @ k[..., cols, :].transpose(-1, -2)
        cosine = dots * rq[..., rows, :] * rk[..., cols, :].transpose(-1, -2)
        m = clamp_logits((scale * dots - lam * cosine) / tau)
        b = _bias_block(bias, rows, cols)
        if b is not None:
            m = clamp_logits(m + b)
        if valid is not None:
            m = m.masked_fill(~valid[..., cols], -math.inf)
        return m

    row_step = max(1, block_elements // max(nk, 1))
    col_step = max(1, block_elements // max(nq, 1))
    rows = [slice(i, i + row_step) for i in range(0, nq, row_step)]
    cols = [slice(j, j + col_step) for j in range(0, nk, col_step)]
    every = slice(None)
    if valid is not None:
        n_valid = valid.sum(-1, keepdim=True).to(acc)  # (B, 1, 1, 1)
    else:
        n_valid = torch.full((), float(nk), dtype=acc, device=q.device)
    log_marginal = torch.log(nq / n_valid)
    g = q.new_zeros(*q.shape[:-2], 1, nk)
    for _ in range(iters):
        f = torch.cat([_potential(logits(r, every) + g, dim=-1) for r in rows], dim=-2)
        col_lse = torch.cat([_lse(logits(every, c) + f, dim=-2) for c in cols], dim=-1)
        g = torch.where(torch.isfinite(col_lse), log_marginal - col_lse, g)
    for r in rows:
        out[..., r, :] = _softmax(logits(r, every) + g, dim=-1) @ v
    return out.to(q_dtype)
