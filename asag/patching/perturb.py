"""What replaces ``scaled_dot_product_attention`` in the perturbed chunk of a guided batch.

(Besides ASAG, the variants PAG, SEG-style blur and "noise" serve the paper's comparisons.)

Self-attention: Sinkhorn attention with the adversarial cost (``asag.ops.sinkhorn_attention``).

Joint attention (text and image tokens in one sequence): only the image-to-image block is
perturbed. Text query rows keep their normal output. An image query keeps the share of its
normal attention that went to text keys, attending to them as before; the share that went to
image keys is spread by the Sinkhorn plan of the image-image block instead of softmax:

    out_i = w_i * softmax(s_i,text) v_text + (1 - w_i) * Sinkhorn(s_i,image) v_image

with ``w_i`` the text share of the normal softmax. With ``lam = 0, iters = 0`` this is exactly
normal attention.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ops

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


VARIANTS = ("sinkhorn", "identity", "noise", "blur")


@dataclass(frozen=True)
class Perturbation:
    """A guidance context: the batch holds ``chunks`` equal chunks; those in ``perturbed`` go
    through the perturbed attention, the others are left untouched.

    ``variant``: "sinkhorn" (ASAG: adversarial Sinkhorn attention), and for the comparisons
    and ablations of the paper: "noise" (ASAG without Sinkhorn: softmax over the scores plus
    ``lam`` times seeded N(0, 1) noise), "identity" (PAG: each query's output is its own
    value), "blur" (SEG-style: queries Gaussian-blurred over the token grid, sigma ``lam``).
    """

    chunks: int
    perturbed: Tuple[int, ...]
    lam: float
    iters: int
    tau: float = 1.0
    variant: str = "sinkhorn"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.perturbed, int) and not isinstance(self.perturbed, bool):
            object.__setattr__(self, "perturbed", (self.perturbed,))
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise ValueError(f"chunks must be an int >= 1, got {self.chunks!r}")
        if not isinstance(self.perturbed, (tuple, list)):
            raise TypeError(f"perturbed must be a chunk index or a list of them, got {self.perturbed!r}")
        object.__setattr__(self, "perturbed", tuple(self.perturbed))
        bad = [p for p in self.perturbed if isinstance(p, bool) or not (isinstance(p, int) and 0 <= p < self.chunks)]
        if bad or not self.perturbed:
            raise ValueError(f"perturbed must list chunk indices in [0, {self.chunks}), got {self.perturbed!r}")
        ops._checks.check_scalars(lam=self.lam, iters=self.iters, tau=self.tau)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")


def bind_sdpa(args, kwargs) -> dict:
    """SDPA's arguments by name, defaults filled in."""
    bound = dict(zip(_SDPA_PARAMS, args))
    bound.update(kwargs)
    bound.setdefault("attn_mask", None)
    bound.setdefault("dropout_p", 0.0)
    bound.setdefault("is_causal", False)
    bound.setdefault("scale", None)
    bound.setdefault("enable_gqa", False)
    return bound


def _rows(t: Optional[torch.Tensor], start: int, stop: int, batch: int):
    """Batch rows [start, stop) of a mask that may broadcast over the batch."""
    if t is None or t.dim() < 4 or t.shape[0] == 1:
        return t
    if t.shape[0] != batch:
        raise ValueError(f"attn_mask batch {t.shape[0]} does not match the query batch {batch}")
    return t[start:stop]


def _bias(attn_mask, is_causal: bool, nq: int, nk: int, device) -> Optional[torch.Tensor]:
    if not is_causal:
        return attn_mask
    causal = torch.ones(nq, nk, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, -math.inf)


def _take(t: Optional[torch.Tensor], rows: slice, cols: slice, nq: int, nk: int) -> Optional[torch.Tensor]:
    """The (rows, cols) block of a bias broadcastable to (..., nq, nk)."""
    if t is None:
        return None
    if t.dim() >= 2 and t.shape[-2] == nq:
        t = t[..., rows, :]
    if t.dim() >= 1 and t.shape[-1] == nk:
        t = t[..., cols]
    return t


def _additive(bias: torch.Tensor) -> torch.Tensor:
    return torch.where(bias, 0.0, -math.inf) if bias.dtype == torch.bool else bias


def _logsumexp_rows(q, k, scale, bias, block=1024):
    """LSE over keys of q k^T * scale + bias, row block by row block (never the full matrix)."""
    n = q.shape[-2]
    out = []
    for start in range(0, n, block):
        rows = slice(start, start + block)
        s = (q[..., rows, :] @ k.transpose(-1, -2)) * scale
        if bias is not None:
            s = s + _additive(bias[..., rows, :] if bias.dim() >= 2 and bias.shape[-2] == n else bias)
        out.append(torch.logsumexp(s, dim=-1))
    return torch.cat(out, dim=-1)


def _gaussian_rows(n: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """(n, n) Gaussian weights, rows normalised: position i averages its neighbours, and an
    infinite sigma gives the plain mean (no padding artefacts at the borders)."""
    pos = torch.arange(n, device=like.device, dtype=torch.float32)
    w = torch.exp(-0.5 * ((pos[:, None] - pos[None]) / sigma) ** 2)
    return (w / w.sum(dim=1, keepdim=True)).to(like.dtype)


def _blur_queries(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of the queries over their token grid (square grids; else the sequence)."""
    if sigma <= 0:
        return q
    b, h, n, d = q.shape
    side = math.isqrt(n)
    if side * side != n:
        return _gaussian_rows(n, sigma, q) @ q
    w = _gaussian_rows(side, sigma, q)
    grid = q.reshape(b, h, side, side, d)
    grid = torch.einsum("ij,bhjkd->bhikd", w, grid)
    grid = torch.einsum("kl,bhild->bhikd", w, grid)
    return grid.reshape(b, h, n, d)


def adversarial_attention(q, k, v, bias, scale, p: Perturbation):
    """The perturbed attention of one chunk (q, k, v: (B, H, N, D)), by variant."""
    if p.variant == "sinkhorn":
        return ops.sinkhorn_attention(q, k, v, lam=p.lam, iters=p.iters, tau=p.tau, scale=scale, attn_bias=bias)
    if p.variant == "identity":
        if q.shape[-2] != v.shape[-2]:
            raise ValueError("the identity (PAG) variant needs as many queries as keys")
        return v
    if p.variant == "blur":
        return F.scaled_dot_product_attention(_blur_queries(q, p.lam), k, v, attn_mask=bias, scale=scale)
    g = torch.Generator(device=q.device).manual_seed(p.seed)
    noise = torch.randn(q.shape[:-1] + (k.shape[-2],), generator=g, device=q.device, dtype=torch.float32)
    noise = (p.lam * noise).to(q.dtype)
    if bias is not None:
        noise = noise + (_additive(bias).to(q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=noise, scale=scale)


def sinkhorn_joint(q, k, v, bias, scale, p: Perturbation, text_tokens: int, text_first: bool, text_queries: bool = True):
    """Joint attention with only its image-to-image block perturbed (module docstring).

    ``text_tokens`` text keys sit at the start (``text_first``) or the end of the keys. With
    ``text_queries`` the queries hold the same text tokens at the same place, and those rows
    get plain SDPA over every key, as without asag; without it (attention with added text
    keys and values) every query is an image token."""
    nq, nk = q.shape[-2], k.shape[-2]
    if text_tokens <= 0:
        return adversarial_attention(q, k, v, bias, scale, p)
    txt_k = slice(0, text_tokens) if text_first else slice(nk - text_tokens, nk)
    img_k = slice(text_tokens, nk) if text_first else slice(0, nk - text_tokens)
    if text_queries:
        txt_q, img_q = txt_k, img_k
        text_rows = F.scaled_dot_product_attention(q[..., txt_q, :], k, v, attn_mask=_take(bias, txt_q, slice(None), nq, nk), scale=scale)
    else:
        img_q, text_rows = slice(None), None
    f32 = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_i, k_t, v_t, k_i, v_i = (t.to(f32) for t in (q[..., img_q, :], k[..., txt_k, :], v[..., txt_k, :], k[..., img_k, :], v[..., img_k, :]))
    if bias is not None and bias.dtype != torch.bool:
        bias = bias.to(f32)
    bias_it, bias_ii = _take(bias, img_q, txt_k, nq, nk), _take(bias, img_q, img_k, nq, nk)
    s_t = (q_i @ k_t.transpose(-1, -2)) * scale
    if bias_it is not None:
        s_t = s_t + _additive(bias_it)
    lse_t = torch.logsumexp(s_t, dim=-1, keepdim=True)
    lse_i = _logsumexp_rows(q_i, k_i, scale, bias_ii).unsqueeze(-1)
    w_text = torch.nan_to_num(torch.exp(lse_t - torch.logaddexp(lse_t, lse_i)), nan=0.0)
    out_t = torch.nan_to_num(torch.softmax(s_t, dim=-1), nan=0.0) @ v_t
    out_i = adversarial_attention(q_i, k_i, v_i, bias_ii, scale, p).to(f32)
    mixed = (w_text * out_t + (1 - w_text) * out_i).to(q.dtype)
    if text_rows is None:
        return mixed
    parts = [text_rows, mixed] if text_first else [mixed, text_rows]
    return torch.cat(parts, dim=-2)


def row_ranges(p: Perturbation, module_batch: int, sdpa_batch: int, offset: int) -> List[Tuple[int, int]]:
    """The perturbed rows of one SDPA call, as [start, stop) ranges of its batch.

    The module's batch holds ``p.chunks`` equal chunks, one after another. An SDPA call covers
    the whole module batch, the module batch times a factor (tokens split per frame or window,
    batch-major), or a slice of it starting at ``offset`` (modules that call SDPA once per
    sample)."""
    if module_batch % p.chunks:
        raise ValueError(
            f"asag guidance expects a batch of {p.chunks} equal chunks, but this attention layer "
            f"received a batch of {module_batch}"
        )
    per_chunk = module_batch // p.chunks
    if sdpa_batch >= module_batch:
        if sdpa_batch % module_batch:
            raise ValueError(f"asag cannot map an SDPA batch of {sdpa_batch} onto a module batch of {module_batch}")
        factor, offset = sdpa_batch // module_batch, 0
    else:
        factor = 1
    ranges = []
    for c in sorted(p.perturbed):
        start = max(c * per_chunk, offset) - offset
        stop = min((c + 1) * per_chunk, offset + sdpa_batch // factor) - offset
        if stop > start:
            if ranges and ranges[-1][1] == start * factor:
                ranges[-1] = (ranges[-1][0], stop * factor)
            else:
                ranges.append((start * factor, stop * factor))
    return ranges


def perturbed_sdpa(sdpa: dict, p: Perturbation, ranges: List[Tuple[int, int]], joint: Optional[Tuple[int, bool]]):
    """SDPA of one call with the batch rows in ``ranges`` perturbed and every other row
    computed by SDPA as without asag (SDPA runs on those rows only). ``joint``: (text
    tokens, text first, text among the queries) for joint attention, None for self-attention."""
    q, k, v = sdpa["query"], sdpa["key"], sdpa["value"]
    mask, causal, scale = sdpa["attn_mask"], sdpa["is_causal"], sdpa["scale"]
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = (t.unsqueeze(1) for t in (q, k, v))
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)
    if q.dim() != 4:
        raise NotImplementedError(f"asag: SDPA inputs of {q.dim()} dims are not supported (expected 3 or 4)")
    batch = q.shape[0]
    gqa = sdpa["enable_gqa"] and k.shape[1] != q.shape[1]
    scale_value = scale if scale is not None else q.shape[-1] ** -0.5
    pieces, start = [], 0
    for lo, hi in ranges + [(batch, batch)]:
        if lo > start:  # clean rows: exactly what the model computes without asag
            extra = {"enable_gqa": True} if gqa else {}
            pieces.append(F.scaled_dot_product_attention(
                q[start:lo], k[start:lo], v[start:lo], attn_mask=_rows(mask, start, lo, batch),
                dropout_p=sdpa["dropout_p"], is_causal=causal, scale=scale, **extra,
            ))
        if hi > lo:
            qp, kp, vp = q[lo:hi], k[lo:hi], v[lo:hi]
            if gqa:
                kp = kp.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                vp = vp.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            bias = _bias(_rows(mask, lo, hi, batch), causal, q.shape[-2], k.shape[-2], q.device)
            if joint is None:
                adv = adversarial_attention(qp, kp, vp, bias, scale_value, p)
            else:
                adv = sinkhorn_joint(qp, kp, vp, bias, scale_value, p, *joint)
            pieces.append(adv.to(q.dtype))
        start = max(start, hi)
    result = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
    return result.squeeze(1) if squeeze else result
