"""Argument checks of the public ops: a ValueError naming the argument and what was expected,
raised before any work (the C++ ops repeat them for direct torch.ops.asag calls)."""

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# A call always ends in reasonable time: a plan has long converged (or never will) by then.
MAX_ITERS = 10000


def _check_tensor(name: str, t, rank: Optional[int], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(t.shape)}")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def check_scalars(*, lam=None, iters=None, tau=None, scale=None) -> None:
    """lam >= 0 finite, iters int >= 0, tau > 0 finite, scale finite (each when given)."""
    for name, value in (("lam", lam), ("tau", tau), ("scale", scale)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if lam is not None and lam < 0:
        raise ValueError(f"lam must be >= 0 (the adversarial strength), got {lam}")
    if tau is not None and tau <= 0:
        raise ValueError(f"tau must be > 0 (the temperature), got {tau}")
    if iters is not None:
        if isinstance(iters, bool) or not isinstance(iters, numbers.Integral):
            raise TypeError(f"iters must be an int, got {type(iters).__name__}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0 (Sinkhorn iterations), got {iters}")
        if iters > MAX_ITERS:
            raise ValueError(f"iters must be at most {MAX_ITERS} (a bound that keeps every call short), got {iters}")


def check_qk(q, k) -> None:
    _check_tensor("q", q, 4, "(B, H, Nq, D)")
    _check_tensor("k", k, 4, "(B, H, Nk, D)")
    _check_same("k", k, "q", q)
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k must have shape (B, H, Nk, D) with B, H, D of q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )


def check_attention(q, k, v, key_mask, attn_bias) -> None:
    check_qk(q, k)
    _check_tensor("v", v, 4, "(B, H, Nk, Dv)")
    _check_same("v", v, "q", q)
    if v.shape[0] != q.shape[0] or v.shape[1] != q.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must have shape (B, H, Nk, Dv) with B, H of q {tuple(q.shape)} and Nk of "
            f"k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if key_mask is not None:
        _check_mask(key_mask, q.device)
        if tuple(key_mask.shape) != (b, nk):
            raise ValueError(
                f"key_mask must have shape (B, Nk) = {(b, nk)}, got {tuple(key_mask.shape)}"
            )
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor):
            raise TypeError(f"attn_bias must be a torch.Tensor, got {type(attn_bias).__name__}")
        if attn_bias.dtype not in FLOAT_DTYPES + (torch.bool,):
            raise ValueError(f"attn_bias must be a float or bool tensor, got {attn_bias.dtype}")
        if attn_bias.device != q.device:
            raise ValueError(
                f"attn_bias must be on the device of q ({q.device}), got {attn_bias.device}"
            )
        if not _broadcasts_to(attn_bias.shape, (b, h, nq, nk)):
            raise ValueError(
                f"attn_bias must broadcast to (B, H, Nq, Nk) = {(b, h, nq, nk)}, "
                f"got {tuple(attn_bias.shape)}"
            )


def check_sinkhorn(logits, key_mask) -> None:
    _check_tensor("logits", logits, None, "(..., Nq, Nk)")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., Nq, Nk), got {tuple(logits.shape)}")
    if key_mask is not None:
        _check_mask(key_mask, logits.device)
        target = (*logits.shape[:-2], logits.shape[-1])
        if key_mask.dim() != logits.dim() - 1 or not _broadcasts_to(key_mask.shape, target):
            raise ValueError(
                f"key_mask must broadcast to (..., Nk) = {target}, one dim per leading dim of the logits "
                f"(each may be 1), got {tuple(key_mask.shape)} (for (B, H, Nq, Nk) logits and a per-batch "
                "mask, pass key_mask[:, None, :])"
            )


def _check_mask(key_mask, device) -> None:
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be a bool tensor (True = valid key), got {key_mask.dtype}")
    if key_mask.device != device:
        raise ValueError(f"key_mask must be on the device of the inputs ({device}), got {key_mask.device}")
