"""Sampling the demo's models with a guidance method (none, CFG, PAG, SEG-style, ASAG...)."""

from dataclasses import dataclass
from typing import Optional

import torch

from ..guidance import ASAGConfig, guided_prediction

TRAIN_STEPS = 1000


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule="squaredcos_cap_v2")


def make_sampler(steps: int):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=TRAIN_STEPS, beta_schedule="squaredcos_cap_v2", clip_sample=True,
        set_alpha_to_one=True, timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass
class Method:
    """A guidance method: CFG scale (conditional model only) and an optional perturbed-attention
    branch (ASAG or one of the comparison variants), and how many denoiser evaluations it
    costs per step."""

    name: str
    cfg_scale: float = 1.0
    perturb: Optional[ASAGConfig] = None

    def evaluations(self, conditional: bool) -> int:
        return 1 + int(conditional and self.cfg_scale > 1) + int(self.perturb is not None and self.perturb.scale != 0)


OFF = ASAGConfig(scale=0.0)


@torch.no_grad()
def sample(model, method: Method, n: int, seed: int, steps: int, labels=None, null_label=None, progress=None,
           stats=None):
    """n samples (n, 1, 8, 8) in [-1, 1]. ``labels`` (n,) make it class-conditional (the DiT);
    ``progress`` wraps the step iterator (e.g. tqdm). ``stats`` (a dict), when given, receives
    the size of the perturbation over the steps where it runs: ``perturbation``, the mean
    |eps_cond - eps_adv|, and ``displacement``, the mean |scale (eps_cond - eps_adv)| (the
    guidance term's size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    scheduler = make_sampler(steps)
    timesteps = scheduler.timesteps
    iterator = progress(range(len(timesteps))) if progress else range(len(timesteps))
    sizes = []
    measure = None if stats is None else (
        lambda b: sizes.append(((b["eps_cond"] - b["eps_adv"]).abs().mean().item(), b["scale"]))
    )
    for i in iterator:
        t = timesteps[i]
        t_batch = torch.full((n,), int(t), dtype=torch.long)
        cond = {"y": labels} if labels is not None else {}
        uncond = {"y": torch.full_like(labels, null_label)} if labels is not None and method.cfg_scale > 1 else None
        eps = guided_prediction(
            model, x, t_batch, cond=cond, uncond=uncond, cfg_scale=method.cfg_scale,
            progress=i / max(len(timesteps) - 1, 1), config=method.perturb or OFF, seed=seed + i, on_branches=measure,
        )
        x = scheduler.step(eps, t, x).prev_sample
    if stats is not None and sizes:
        stats["perturbation"] = sum(d for d, _ in sizes) / len(sizes)
        stats["displacement"] = sum(d * w for d, w in sizes) / len(sizes)
    return x.clamp(-1, 1)
