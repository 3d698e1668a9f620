"""ASAG inside an ordinary diffusers pipeline: ``asag.enable(pipe, ...)``.

Forward hooks on the pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``) turn each
denoiser call that falls inside the guidance interval into one with the perturbed branch:

- "batched": the CFG batch ``[u, c]`` becomes ``[u, c, c_adv]`` (``[c]`` becomes
  ``[c, c_adv]`` without CFG, e.g. Flux), every batched argument extended along (text
  embeddings, SDXL ``added_cond_kwargs``, ControlNet residuals, IP-Adapter image embeddings,
  attention masks, timesteps). Cost: the batch grows by half with CFG (doubles without), in
  one forward pass.
- "sequential": the denoiser runs as the pipeline asked, then once more on the conditional
  chunk with the perturbation. Cost: one more forward pass per step; peak activation memory
  as without ASAG.

The hook then returns the ASAG prediction ``eps`` in place of the denoiser's output, as
``[eps, eps]`` under CFG, so the pipeline's own arithmetic ``u + w (c - u)`` yields exactly
``eps``. Outside the interval (or with scale 0) the call is left entirely alone: images are
bit-identical to the plain pipeline's. The step's progress comes from the pipeline's
scheduler (see :meth:`PipelineGuidance.progress`).
"""

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..patching import apply as apply_asag
from ..patching.perturb import Perturbation
from .config import ASAGConfig
from .formula import combine, rescale

# Arguments that carry no batch dimension although their first size may equal the batch.
NOT_BATCHED = ("img_ids", "txt_ids", "image_rotary_emb", "video_coords")

_ENABLED: "weakref.WeakKeyDictionary[Any, PipelineGuidance]" = weakref.WeakKeyDictionary()


def _map_batched(obj, batch: int, fn, key: Optional[str] = None):
    """Applies fn to every tensor in obj (nested lists, tuples, dicts) whose first dimension
    is the batch."""
    if key in NOT_BATCHED:
        return obj
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, (list, tuple)):
        mapped = [_map_batched(o, batch, fn) for o in obj]
        return type(obj)(mapped) if not hasattr(obj, "_fields") else type(obj)(*mapped)
    if isinstance(obj, dict):
        return type(obj)((k, _map_batched(v, batch, fn, k)) for k, v in obj.items())
    return obj


def _sample_of(args, kwargs) -> torch.Tensor:
    for name in ("sample", "hidden_states", "x"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise ValueError("asag.enable: cannot find the denoiser's latent input (sample / hidden_states)")


def _output_sample(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output["sample"] if "sample" in output else output[0]


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    output["sample"] = sample
    return output


def denoiser_of(pipe) -> torch.nn.Module:
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"asag.enable: {type(pipe).__name__} has neither a .unet nor a .transformer")


@dataclass
class _Call:
    """One guided denoiser call in flight."""

    batch: int
    cond: slice
    cfg: bool
    scale: float
    perturbation: Perturbation
    args: tuple = ()
    kwargs: Optional[dict] = None


class PipelineGuidance:
    """ASAG attached to one pipeline (what :func:`enable` returns; a context manager)."""

    def __init__(self, pipe, config: ASAGConfig, denoiser: Optional[torch.nn.Module] = None):
        self.pipe = pipe
        self.config = config
        self.denoiser = denoiser if denoiser is not None else denoiser_of(pipe)
        self.handle = apply_asag(self.denoiser, layers=config.layers)
        self._calls = []
        self._inside = False
        self._hooks = []
        try:
            self._hooks.append(self.denoiser.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._hooks.append(self.denoiser.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        except Exception:
            self.disable()
            raise

    # ---- progress and CFG state from the pipeline -----------------------------------------

    def progress(self, args, kwargs) -> float:
        """Sampling progress of the current step in [0, 1] (0: first step, 1: last), from the
        pipeline's scheduler: the position of this call's timestep in its timesteps, else its
        step index, else the timestep over the training horizon."""
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor) and t.numel() and isinstance(timesteps, torch.Tensor) and len(timesteps):
            hits = (timesteps.to(t.device) == t.flatten()[0]).nonzero()
            if len(hits):
                return int(hits[0]) / max(len(timesteps) - 1, 1)
        if timesteps is not None and getattr(scheduler, "step_index", None) is not None:
            return min(scheduler.step_index / max(len(timesteps) - 1, 1), 1.0)
        if timesteps is not None and hasattr(scheduler, "step_index"):  # before the first step
            return (getattr(scheduler, "begin_index", None) or 0) / max(len(timesteps) - 1, 1)
        total = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        if isinstance(t, torch.Tensor) and t.numel() and total:
            return min(max(1.0 - float(t.flatten()[0]) / total, 0.0), 1.0)
        return 0.0

    def _cfg(self, batch: int) -> bool:
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0

    # ---- hooks ---------------------------------------------------------------------------

    def _pre(self, module, args, kwargs):
        if self._inside or self.handle._probing:
            return None
        progress = self.progress(args, kwargs)
        if not self.config.active_at(progress):
            self._calls.append(None)
            return None
        # Classify the layers on the first guided call, here: the handle's own hook has run
        # before this one, while no perturbation was set yet.
        self._inside = True
        try:
            self.handle.ensure_probed(*args, **kwargs)
        finally:
            self._inside = False
        batch = _sample_of(args, kwargs).shape[0]
        cfg = self._cfg(batch)
        n = batch // 2 if cfg else batch
        cond = slice(batch - n, batch)
        chunks = 3 if cfg else 2
        if self.config.mode == "sequential":
            call = _Call(batch, cond, cfg, self.config.scale_at(progress), self.config.perturbation(progress), args, kwargs)
            self._calls.append(call)
            return None
        call = _Call(batch, cond, cfg, self.config.scale_at(progress),
                     self.config.perturbation(progress, chunks, (chunks - 1,)))
        self._calls.append(call)
        extend = lambda t: torch.cat([t, t[cond]])  # noqa: E731
        new_args = _map_batched(tuple(args), batch, extend)
        new_kwargs = {k: _map_batched(v, batch, extend, k) for k, v in kwargs.items()}
        self.handle._perturbation = call.perturbation
        return new_args, new_kwargs

    def _post(self, module, args, kwargs, output):
        if self._inside or self.handle._probing:
            return None
        call = self._calls.pop() if self._calls else None
        self.handle._perturbation = None
        if call is None or output is None:
            return None
        sample = _output_sample(output)
        if self.config.mode == "sequential":
            take = lambda t: t[call.cond]  # noqa: E731
            cond_args = _map_batched(tuple(call.args), call.batch, take)
            cond_kwargs = {k: _map_batched(v, call.batch, take, k) for k, v in call.kwargs.items()}
            self._inside = True
            self.handle._perturbation = call.perturbation
            try:
                eps_adv = _output_sample(module(*cond_args, **cond_kwargs))
            finally:
                self._inside = False
                self.handle._perturbation = None
            main = sample
        else:
            main, eps_adv = sample[: call.batch], sample[call.batch :]
        eps_cond = main[call.cond]
        eps_uncond = main[: call.batch - eps_cond.shape[0]] if call.cfg else None
        cfg_scale = float(getattr(self.pipe, "guidance_scale", 1.0)) if call.cfg else 1.0
        eps = combine(eps_cond, eps_adv, call.scale, eps_uncond=eps_uncond, cfg_scale=cfg_scale)
        eps = rescale(eps, eps_cond, self.config.rescale)
        return _with_sample(output, torch.cat([eps, eps]) if call.cfg else eps)

    # ---- life cycle ----------------------------------------------------------------------

    def disable(self) -> None:
        """Removes every hook; the denoiser is exactly as before asag.enable."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.handle.remove()
        if _ENABLED.get(self.pipe) is self:
            del _ENABLED[self.pipe]

    def __enter__(self) -> "PipelineGuidance":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()


def enable(pipe, *, denoiser: Optional[torch.nn.Module] = None, **config) -> PipelineGuidance:
    """Turns ASAG on for a diffusers pipeline; returns a handle usable as a context manager.

    ``asag.enable(pipe, scale=3.0, lam=2.0, iters=5, layers="mid", mode="batched")``; every
    parameter of :class:`asag.guidance.ASAGConfig` is accepted (schedules, interval, rescale).
    Then call the pipeline as usual. Cost per guided step: "batched" makes the denoiser batch
    1.5x the CFG batch (2x without CFG) in one pass; "sequential" adds one forward pass on the
    conditional batch instead. ``asag.disable(pipe)`` (or leaving the ``with`` block) restores
    the pipeline exactly. Enabling again replaces the previous settings.
    """
    settings = ASAGConfig(**config)
    previous = _ENABLED.get(pipe)
    if previous is not None:
        previous.disable()
    guidance = PipelineGuidance(pipe, settings, denoiser)
    _ENABLED[pipe] = guidance
    return guidance


def disable(pipe) -> None:
    """Turns ASAG off for the pipeline (no-op when it is not enabled)."""
    guidance = _ENABLED.get(pipe)
    if guidance is not None:
        guidance.disable()
