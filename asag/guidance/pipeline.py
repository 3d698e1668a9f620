"""ASAG inside an ordinary diffusers pipeline: ``asag.enable(pipe, ...)``.

Forward hooks on the pipeline's denoisers (``pipe.unet``, ``pipe.transformer``,
``pipe.transformer_2``...) act on the calls that the enabled pipeline makes, and only those
(a denoiser shared with another pipeline, or called directly, is left alone). For each call
inside the guidance interval, :mod:`asag.guidance.roles` tells its unconditional rows ``u``
and conditional rows ``c`` from the pipeline's own variables, and the weight ``w`` the
pipeline's CFG gives ``c``. Then one adversarial branch per conditional sample is computed:

- "batched": the call's batch grows by its conditional rows (``[u, c]`` becomes
  ``[u, c, c_adv]``; ``[c]`` becomes ``[c, c_adv]``), every batched argument extended along,
  in one forward pass;
- "sequential": one more forward pass on the conditional rows.

The call returns the pipeline's batch with its conditional rows replaced by
``c' = c + (s / w) (c - c_adv)``, so the pipeline's own arithmetic, ``u + w (c' - u)``,
yields ``u + w (c - u) + s (c - c_adv)``, and its guidance rescale, dynamic CFG, skip-layer
guidance or CFG normalisation keep working on top. Further calls of the same step on the same
conditional samples (SD3's skip-layer call) get the same shift ``(s / w)(c - c_adv)``, so the
pipeline's differences between them are unchanged. Outside the interval, or with scale 0, the
call is left entirely alone: images are bit-identical to the plain pipeline's.
"""

import collections
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from ..patching.apply import apply as apply_asag
from ..patching.apply import unwrap
from ..patching.handle import _disable, existing_handle
from ..patching.perturb import Perturbation
from . import roles
from .config import ASAGConfig
from .formula import rescale

# Arguments that carry no batch dimension although their first size may equal the batch.
NOT_BATCHED = re.compile(r"^(img_ids|txt_ids|video_coords|img_shapes|txt_seq_lens)$|rotary|rope|freqs")
DENOISER = re.compile(r"^(unet|transformer)(_\d+)?$")

_ENABLED: "weakref.WeakKeyDictionary[Any, PipelineGuidance]" = weakref.WeakKeyDictionary()
_local = threading.local()


def _map_batched(obj, fn, key: str = ""):
    """Applies fn to every tensor in obj (nested lists, tuples, dicts), except arguments named
    as unbatched; fn decides from the tensor's first size."""
    if NOT_BATCHED.search(key):
        return obj
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        mapped = [_map_batched(o, fn, key) for o in obj]
        return type(obj)(mapped) if not hasattr(obj, "_fields") else type(obj)(*mapped)
    if isinstance(obj, dict):
        return type(obj)((k, _map_batched(v, fn, str(k))) for k, v in obj.items())
    return obj


def _row_index(t: torch.Tensor, batch: int, frames: int, rows: List[int]) -> Optional[torch.Tensor]:
    """The indices of ``rows`` of a batch in a tensor whose first size is the batch, or the
    batch times the frames of a video sample (rows repeated per frame, batch-major, as
    AnimateDiff repeats its prompt embeddings); None if it is not batched."""
    if t.dim() == 0:
        return None
    k = 1 if t.shape[0] == batch else (frames if frames > 1 and t.dim() >= 2 and t.shape[0] == batch * frames else 0)
    if not k:
        return None
    return torch.tensor([r * k + j for r in rows for j in range(k)], device=t.device)


def _check_placeable(name: str, t: torch.Tensor, batch: int, frames: int) -> None:
    """Refuses a conditioning-like tensor that holds the batch in a later dimension (HiDream's
    Llama embeddings are (layers, batch, tokens, dim)): asag extends and cuts batches along the
    first dimension only, and will not guess another."""
    if not t.is_floating_point() or t.dim() < 3 or batch < 2 or t.shape[0] in (batch, batch * frames, 1):
        return
    if batch in t.shape[1:]:
        raise roles.UnknownRole(roles._message(
            f"argument {name} of shape {tuple(t.shape)} holds the batch ({batch}) in dimension "
            f"{list(t.shape).index(batch, 1)}, not first, so asag cannot add the adversarial rows to it"))


def _select_rows(args, kwargs, batch: int, rows: List[int], keep: bool):
    """(args, kwargs) with the batched tensors cut to ``rows`` (keep=False), or extended by a
    copy of those rows at the end (keep=True)."""
    sample = _sample_of(args, kwargs)
    frames = sample.shape[2] if sample.dim() == 5 else 1
    named = [(f"positional argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        if not NOT_BATCHED.search(str(name)):
            _map_batched(value, lambda t, n=name: _check_placeable(n, t, batch, frames) or t, str(name))

    def fn(t):
        index = _row_index(t, batch, frames, rows)
        if index is None:
            return t
        picked = t.index_select(0, index)
        return torch.cat([t, picked]) if keep else picked

    return _map_batched(tuple(args), fn), {k: _map_batched(v, fn, k) for k, v in kwargs.items()}


def _sample_of(args, kwargs) -> torch.Tensor:
    for name in ("sample", "hidden_states", "x"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise ValueError("asag.enable: cannot find the denoiser's latent input (sample / hidden_states)")


def _timestep(args, kwargs) -> Optional[float]:
    t = kwargs.get("timestep", kwargs.get("t", args[1] if len(args) > 1 else None))
    if isinstance(t, torch.Tensor) and t.numel():
        return float(t.flatten()[0])
    return float(t) if isinstance(t, (int, float)) else None


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
    key = "sample" if "sample" in output else next(iter(output.keys()))
    output[key] = sample
    return output


def denoisers_of(pipe) -> List[torch.nn.Module]:
    """The pipeline's denoisers: its ``unet`` / ``transformer`` components (and numbered ones)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = {n: getattr(pipe, n, None) for n in ("unet", "transformer", "transformer_2")}
    found = [m for n, m in components.items() if DENOISER.match(n) and isinstance(m, torch.nn.Module)]
    if not found:
        if isinstance(pipe, torch.nn.Module):
            raise TypeError(
                f"asag.enable takes a diffusers pipeline, not a model ({type(pipe).__name__}): use "
                "asag.apply(model) and handle.guidance(...), or asag.guided_prediction in your own loop"
            )
        raise TypeError(
            f"asag.enable takes a diffusers pipeline (an object with a .unet or .transformer denoiser), "
            f"got {type(pipe).__name__}"
        )
    return found


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's (first) denoiser."""
    return denoisers_of(pipe)[0]


def _refuse_batch_changing_guidance(pipe) -> None:
    """diffusers' PAG pipelines put their own perturbed branch in the batch ([u, c, c_pag])
    and split it by position: another branch in that batch would be split wrongly."""
    try:
        from diffusers.pipelines.pag.pag_utils import PAGMixin
    except ImportError:
        return
    if isinstance(pipe, PAGMixin):
        raise ValueError(
            f"asag.enable cannot guide {type(pipe).__name__}: diffusers' PAG pipelines add their own "
            "perturbed-attention branch to the batch ([uncond, cond, cond_pag]) and split it by position, "
            "so ASAG's branch cannot join it. Use the same components in the plain pipeline instead, e.g. "
            "StableDiffusionPipeline(**pipe.components) without PAG, then asag.enable on it"
        )


def _thread(owner) -> dict:
    states = getattr(_local, "states", None)
    if states is None:
        states = _local.states = weakref.WeakKeyDictionary()
    if owner not in states:
        states[owner] = {"calls": [], "nested": False, "step": None}
    return states[owner]


@dataclass
class _Step:
    """One model evaluation of the sampler (a timestep, one or more denoiser calls)."""

    t: Optional[float]
    samples: torch.Tensor  # sample rows seen at this step
    cfg: Optional[bool] = None  # whether CFG was assumed for the conditional rows
    w: float = 1.0
    uncond_seen: bool = False
    cond_samples: Optional[torch.Tensor] = None
    delta: Optional[torch.Tensor] = None  # (s / w)(c - c_adv) per conditional sample
    cond: Optional[torch.Tensor] = None  # c and c' (for asag's own rescale)
    shifted: Optional[torch.Tensor] = None
    uncond: Optional[torch.Tensor] = None

    def holds(self, t, rows: torch.Tensor) -> bool:
        return t == self.t and all(any(torch.equal(r, s) for s in self.samples) for r in rows)


@dataclass
class _Call:
    """One denoiser call of the enabled pipeline in flight."""

    kind: str  # "branch" | "shift" | "uncond"
    batch: int
    cond: List[int]
    uncond: List[int]
    step: _Step
    samples: Optional[torch.Tensor] = None  # the sample rows of the conditional samples
    coef: float = 0.0
    perturbation: Optional[Perturbation] = None
    hits: int = 0
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class _Dispatcher:
    """The hooks on one denoiser: they pass each call to the enabled pipeline that made it."""

    def __init__(self, module: torch.nn.Module, layers):
        self.module = module
        handle = existing_handle(module)
        self.owns_handle = handle is None
        self.handle = handle if handle is not None else apply_asag(module, layers=layers)
        self.guidances: List["weakref.ref[PipelineGuidance]"] = []
        self.hooks = [
            module.register_forward_pre_hook(_DispatchPre(self), with_kwargs=True),
            module.register_forward_hook(_DispatchPost(self), with_kwargs=True, always_call=True),
        ]

    @staticmethod
    def of(module: torch.nn.Module) -> Optional["_Dispatcher"]:
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _DispatchPre) and hook.dispatcher.module is module and hook.dispatcher.hooks:
                return hook.dispatcher
        return None

    def live(self) -> List["PipelineGuidance"]:
        return [g for g in (r() for r in self.guidances) if g is not None and g.enabled]

    def discard(self, guidance: "PipelineGuidance") -> None:
        self.guidances = [r for r in self.guidances if r() is not None and r() is not guidance]
        if not self.handle.removed:
            self.handle._remove_user(guidance.key)
        if not self.live():
            for h in self.hooks:
                h.remove()
            self.hooks = []
            if self.owns_handle:
                self.handle.remove()

    def pre(self, module, args, kwargs):
        state = _thread(self)
        if state["nested"]:
            return None
        state["calls"].clear()  # left over from an interrupted call
        guidances = self.live()
        hit = roles.pipeline_frames([g.pipe for g in guidances]) if guidances else None
        if hit is None:
            state["calls"].append(None)
            return None
        pipe, frames = hit
        guidance = next(g for g in guidances if g.pipe is pipe)
        call, new = guidance._on_call(self, args, kwargs, frames)
        state["calls"].append((guidance, call))
        return new

    def post(self, module, args, kwargs, output):
        state = _thread(self)
        if state["nested"] or not state["calls"]:
            return None
        entry = state["calls"].pop()
        if entry is None:
            return None
        guidance, call = entry
        if call is None:
            return None
        if output is None:  # the forward raised: forget the call
            self.handle._end_call()
            return None
        return guidance._on_output(self, call, output)

    def nested(self, fn, *args, **kwargs):
        """Runs fn with this dispatcher's hooks standing aside (probe, sequential branch)."""
        state = _thread(self)
        state["nested"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            state["nested"] = False


class _DispatchPre:
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    @_disable
    def __call__(self, module, args, kwargs):
        return self.dispatcher.pre(module, args, kwargs)


class _DispatchPost:
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    @_disable
    def __call__(self, module, args, kwargs, output):
        return self.dispatcher.post(module, args, kwargs, output)


class PipelineGuidance:
    """ASAG attached to one pipeline (what :func:`enable` returns; a context manager)."""

    def __init__(self, pipe, config: ASAGConfig, denoiser: Optional[torch.nn.Module] = None):
        modules = [unwrap(denoiser)] if denoiser is not None else [unwrap(m) for m in denoisers_of(pipe)]
        _refuse_batch_changing_guidance(pipe)
        self.pipe, self.config = pipe, config
        self.denoisers = modules
        self.key = ("asag.enable", id(self))
        self.enabled = True
        # The ASAG scale of the latest guided denoiser calls, in order (automatic or not).
        self.scales = collections.deque(maxlen=4096)
        self._dispatchers: List[_Dispatcher] = []
        try:
            for module in modules:
                dispatcher = _Dispatcher.of(module) or _Dispatcher(module, config.layers)
                dispatcher.handle._add_user(self.key, config.layers)
                dispatcher.guidances.append(weakref.ref(self))
                self._dispatchers.append(dispatcher)
        except BaseException:
            self.disable()
            raise

    @property
    def handle(self):
        """The asag handle of the (first) denoiser."""
        return self._dispatchers[0].handle if self._dispatchers else None

    @property
    def layers(self):
        """The layers this pipeline's guidance perturbs, per denoiser."""
        return [d.handle.selected_for(self.key) for d in self._dispatchers]

    @property
    def _hooks(self):  # non-empty while enabled
        return [d.hooks for d in self._dispatchers] if self.enabled else []

    # ---- progress ----------------------------------------------------------------------------

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

    # ---- one denoiser call -----------------------------------------------------------------------

    def _step(self, dispatcher, t, sample: torch.Tensor) -> _Step:
        state = _thread(self)
        step = state["step"]
        if step is not None and step.holds(t, sample):
            return step
        if step is not None and step.cfg and not step.uncond_seen:
            state["step"] = None
            raise roles.UnknownRole(roles._message(
                "asag expected the pipeline to combine the last step's conditional prediction with an "
                "unconditional one made in another call, but no such call came"))
        step = state["step"] = _Step(t, sample.detach())
        return step

    def _on_call(self, dispatcher: _Dispatcher, args, kwargs, frames):
        progress = self.progress(args, kwargs)
        if not self.config.active_at(progress):
            return None, None
        sample = _sample_of(args, kwargs)
        labels = roles.row_roles(args, kwargs, sample, frames)
        cond = [i for i, r in enumerate(labels) if r == "c"]
        uncond = [i for i, r in enumerate(labels) if r == "u"]
        latents = roles.variable(frames, "latents")
        samples = latents.shape[0] if isinstance(latents, torch.Tensor) and latents.dim() else None
        if samples is not None and not cond and len(uncond) > samples:
            raise roles.UnknownRole(roles._message(
                f"{len(uncond)} rows for {samples} samples look unconditional: rows that match both a prompt "
                "and a negative prompt (identical embeddings) cannot be told apart"))
        if samples is not None and len(cond) > samples:
            raise roles.UnknownRole(roles._message(
                f"{len(cond)} rows look conditional for {samples} samples: the pipeline either runs another "
                "guidance that adds conditional branches to the batch, or builds its unconditional rows from "
                "variables asag cannot recognise"))
        t = _timestep(args, kwargs)
        step = self._step(dispatcher, t, sample)
        if uncond:
            if step.cfg is False:
                raise roles.UnknownRole(roles._message("an unconditional call came in a step that asag had judged to run without CFG"))
            step.uncond_seen = True
        if not cond:
            return _Call("uncond", sample.shape[0], cond, uncond, step), None
        rows = sample[cond].detach()
        if step.delta is not None and all(any(torch.equal(r, s) for s in step.cond_samples) for r in rows):
            return _Call("shift", sample.shape[0], cond, uncond, step, samples=rows), None
        step.cfg = bool(uncond) or roles.cfg_runs(frames, self.pipe)
        step.w = roles.cfg_scale(frames, self.pipe, t) if step.cfg else 1.0
        handle = dispatcher.handle
        dispatcher.nested(handle.ensure_probed, *args, **kwargs)
        scale = self.config.scale_at(progress, step.cfg)
        self.scales.append(scale)
        call = _Call("branch", sample.shape[0], cond, uncond, step, samples=rows, coef=scale / step.w)
        if self.config.mode == "sequential":
            call.perturbation = self.config.perturbation(progress)
            call.args, call.kwargs = args, kwargs
            return call, None
        total = sample.shape[0] + len(cond)
        call.perturbation = self.config.perturbation(progress, total, tuple(range(sample.shape[0], total)))
        new_args, new_kwargs = _select_rows(args, kwargs, sample.shape[0], cond, keep=True)
        call.hits = handle._begin_call(call.perturbation, self.key)
        return call, (new_args, new_kwargs)

    def _on_output(self, dispatcher: _Dispatcher, call: _Call, output):
        step, handle = call.step, dispatcher.handle
        out = _output_sample(output)
        if call.kind == "uncond":
            return self._rescale_uncond(call, output, out)
        if call.kind == "shift":
            new = out.clone()
            for i, row in zip(call.cond, call.samples):
                j = next(j for j, s in enumerate(step.cond_samples) if torch.equal(s, row))
                new[i] = out[i] + step.delta[j].to(out.dtype)
            return _with_sample(output, new)
        if self.config.mode == "sequential":
            cond_args, cond_kwargs = _select_rows(call.args, call.kwargs, call.batch, call.cond, keep=False)
            hits = handle._begin_call(call.perturbation, self.key, nested=True)
            try:
                adv = _output_sample(dispatcher.nested(dispatcher.module, *cond_args, **cond_kwargs))
                handle._check_reached(hits, self.key)
            finally:
                handle._end_call()
            main = out
        else:
            try:
                handle._check_reached(call.hits, self.key)
            finally:
                handle._end_call()
            main, adv = out[: call.batch], out[call.batch:]
        c = main[call.cond]
        delta = call.coef * (c - adv)
        shifted = c + delta
        new = main.clone()
        new[call.cond] = shifted
        step.cond_samples = call.samples
        step.delta, step.cond, step.shifted = delta, c, shifted
        if self.config.rescale:
            new = self._rescale_cond(call, new, main)
        return _with_sample(output, new)

    # ---- asag's own guidance rescale, on the pipeline's combination ---------------------------

    def _rescale_cond(self, call: _Call, new, main):
        """Makes the pipeline's combination come out rescaled: needs u with c (same call, or
        an earlier call of the step), or no CFG."""
        step, phi = call.step, self.config.rescale
        if not step.cfg:
            new[call.cond] = rescale(step.shifted, step.cond, phi)
            return new
        u = main[call.uncond] if call.uncond else step.uncond
        if u is None or u.shape != step.cond.shape:
            return new  # the unconditional call comes later: rescaled there
        eps = u + step.w * (step.shifted - u)
        new[call.cond] = u + (rescale(eps, step.cond, phi) - u) / step.w
        return new

    def _rescale_uncond(self, call: _Call, output, out):
        step, phi = call.step, self.config.rescale
        step.uncond = out[call.uncond].clone() if call.uncond else None
        if not phi or step.shifted is None or step.uncond is None or step.uncond.shape != step.shifted.shape:
            return None
        if step.w == 1:
            raise ValueError("asag rescale= cannot act through a CFG scale of 1 in a two-call pipeline; use rescale=0")
        eps = step.uncond + step.w * (step.shifted - step.uncond)
        new = out.clone()
        new[call.uncond] = (rescale(eps, step.cond, phi) - step.w * step.shifted) / (1 - step.w)
        return _with_sample(output, new)

    # ---- life cycle ------------------------------------------------------------------------------

    def disable(self) -> None:
        """Removes every hook; the denoisers are exactly as before asag.enable."""
        self.enabled = False
        for dispatcher in self._dispatchers:
            dispatcher.discard(self)
        self._dispatchers = []
        if _ENABLED.get(self.pipe) is self:
            del _ENABLED[self.pipe]

    def __enter__(self) -> "PipelineGuidance":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        c = self.config
        state = "enabled" if self.enabled else "disabled"
        lines = [
            f"PipelineGuidance({type(self.pipe).__name__}, {state}, mode={c.mode!r})",
            f"  scale {c.describe_scale()}, lam {c.lam} -> {c.lam_end} ({c.lam_schedule}), "
            f"iters {c.iters}, tau {c.tau}, interval [{c.start}, {c.stop}], rescale {c.rescale}, variant {c.variant!r}",
        ]
        for dispatcher in self._dispatchers:
            handle = dispatcher.handle
            names = sorted(handle.user_layers(self.key))
            chosen = ", ".join(names) if handle.resolved else f"layers={c.layers!r} (resolved at the first guided call)"
            lines.append(f"  {type(dispatcher.module).__name__}: {chosen}")
        return "\n".join(lines)


def enable(pipe, *, denoiser: Optional[torch.nn.Module] = None, **config) -> PipelineGuidance:
    """Turns ASAG on for a diffusers pipeline; returns a handle usable as a context manager.

    ``asag.enable(pipe, scale=3.0, lam=2.0, iters=5, layers="mid", mode="batched")``; every
    parameter of :class:`asag.guidance.ASAGConfig` is accepted (schedules, interval, rescale).
    Then call the pipeline as usual. Cost per guided step: "batched" grows the denoiser batch
    by one row per conditional sample, in one pass; "sequential" adds one forward pass on the
    conditional rows instead. ``asag.disable(pipe)`` (or leaving the ``with`` block) restores
    the pipeline exactly. Enabling again replaces the previous settings of this pipeline;
    other pipelines sharing its denoiser keep theirs.
    """
    settings = ASAGConfig(**config)
    previous = _ENABLED.get(pipe) if _hashable(pipe) else None
    if previous is not None:
        previous.disable()
    guidance = PipelineGuidance(pipe, settings, denoiser)
    _ENABLED[pipe] = guidance
    return guidance


def _hashable(pipe) -> bool:
    try:
        weakref.ref(pipe)
        hash(pipe)
        return True
    except TypeError:
        return False


def disable(pipe) -> None:
    """Turns ASAG off for the pipeline (no-op when it is not enabled)."""
    guidance = _ENABLED.get(pipe) if _hashable(pipe) else None
    if guidance is not None:
        guidance.disable()
