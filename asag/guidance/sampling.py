"""ASAG in a hand-written sampling loop (original DiT code, timm-based DiTs, any denoiser)."""

from typing import Any, Callable, Dict, Optional

import torch

import contextlib

from ..patching import apply as apply_asag
from ..patching.apply import unwrap
from ..patching.handle import existing_handle
from .config import ASAGConfig
from .formula import combine, rescale


def _cat(parts):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    return first


def _batched_t(t, batch: int, copies: int):
    if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch:
        return torch.cat([t] * copies)
    return t


def guided_prediction(
    model: torch.nn.Module,
    x: torch.Tensor,
    t,
    *,
    cond: Optional[Dict[str, Any]] = None,
    uncond: Optional[Dict[str, Any]] = None,
    cfg_scale: float = 1.0,
    progress: float = 0.0,
    config: Optional[ASAGConfig] = None,
    output: Any = None,
    seed: int = 0,
    on_branches: Optional[Callable[[Dict[str, Any]], None]] = None,
    **settings,
) -> torch.Tensor:
    """One guided denoiser prediction: ``eps_u + w_cfg (eps_c - eps_u) + w_asag (eps_c - eps_adv)``.

    The model is called as ``model(x, t, **kwargs)``: ``cond`` / ``uncond`` hold the keyword
    arguments of the conditional and unconditional branches (e.g. ``{"y": labels}`` and
    ``{"y": null_labels}``); ``uncond=None`` or ``cfg_scale <= 1`` means no CFG. ``progress``
    in [0, 1] is the point of sampling (for the schedules and the interval). ASAG settings come
    from ``config`` or keyword arguments of :class:`ASAGConfig` (``scale``, ``lam``, ``iters``,
    ``mode``...). ``output`` picks the prediction from the model's output: a callable, or None
    for a tensor / a tuple's first item / ``.sample``. ``seed`` seeds the "noise" variant.
    ``on_branches``, when given, is called at every step where ASAG runs with a dict of the
    branch predictions (``eps_cond``, ``eps_adv``, ``eps_uncond`` or None) and the ``scale``
    in use: e.g. to measure how far the perturbed prediction is from the conditional one.

    Batched mode runs ``[u, c, c_adv]`` (or ``[c, c_adv]``) in one forward pass; sequential
    mode runs the branches as separate passes.
    """
    config = config if config is not None else ASAGConfig(**settings)
    cond = dict(cond or {})
    use_cfg = uncond is not None and cfg_scale > 1
    pick = output or _prediction
    asag_on = config.active_at(progress)
    handle = (existing_handle(unwrap(model)) or apply_asag(model, layers=config.layers)) if asag_on else None
    branches = ([dict(uncond)] if use_cfg else []) + [cond] + ([cond] if asag_on else [])
    b = x.shape[0]
    if config.mode == "batched":
        k = len(branches)
        kwargs = _cat(branches)
        with handle.perturbing(config.perturbation(progress, k, (k - 1,), seed), config.layers) if asag_on else _nothing():
            out = pick(model(torch.cat([x] * k), _batched_t(t, b, k), **kwargs))
        preds = list(out.chunk(k))
    else:
        preds = [pick(model(x, t, **kw)) for kw in branches[: len(branches) - int(asag_on)]]
        if asag_on:
            with handle.perturbing(config.perturbation(progress, seed=seed), config.layers):
                preds.append(pick(model(x, t, **cond)))
    eps_u = preds[0] if use_cfg else None
    eps_c = preds[1 if use_cfg else 0]
    if not asag_on:
        return eps_c if eps_u is None else eps_u + cfg_scale * (eps_c - eps_u)
    scale = config.scale_at(progress, use_cfg)
    if on_branches is not None:
        on_branches(dict(eps_cond=eps_c, eps_adv=preds[-1], eps_uncond=eps_u, scale=scale))
    eps = combine(eps_c, preds[-1], scale, eps_uncond=eps_u, cfg_scale=cfg_scale)
    return rescale(eps, eps_c, config.rescale)


def _nothing():
    return contextlib.nullcontext()


def _prediction(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample
