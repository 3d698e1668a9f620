"""The ASAG combination (docs/method.md section 2) and guidance rescale."""

from typing import Optional

import torch


def combine(
    eps_cond: torch.Tensor,
    eps_adv: torch.Tensor,
    scale: float,
    *,
    eps_uncond: Optional[torch.Tensor] = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """``eps = eps_u + w_cfg (eps_c - eps_u) + w_asag (eps_c - eps_adv)``.

    Without CFG (``eps_uncond`` None, or ``cfg_scale <= 1`` as in diffusers, e.g. for
    unconditional or guidance-distilled models): ``eps = eps_c + w_asag (eps_c - eps_adv)``.
    """
    eps = eps_cond + scale * (eps_cond - eps_adv)
    if eps_uncond is not None and cfg_scale > 1:
        eps = eps + (cfg_scale - 1) * (eps_cond - eps_uncond)
    return eps


def rescale(eps: torch.Tensor, eps_cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", eq. 15-16): match the per-sample std of ``eps`` to that of ``eps_cond``,
    blended by ``factor`` in [0, 1]. Counters the over-saturation of high guidance scales."""
    if factor == 0:
        return eps
    dims = tuple(range(1, eps.dim()))
    std_cond = eps_cond.std(dim=dims, keepdim=True)
    std_eps = eps.std(dim=dims, keepdim=True)
    rescaled = eps * (std_cond / std_eps.clamp_min(1e-12))
    return factor * rescaled + (1 - factor) * eps
