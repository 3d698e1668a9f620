"""ASAG guidance parameters, validated, with their values at a point of sampling."""

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from ..patching.perturb import VARIANTS, Perturbation
from ..patching.selection import Selection
from .schedule import SHAPES, Schedule

MODES = ("batched", "sequential")
# The scale used when none is given (scale=None), by whether CFG runs: chosen on the validation
# split of the digits quality benchmark (benchmarks/quality/results/chosen.json). On top of CFG
# a small ASAG term does best there; without CFG, ASAG is the only guidance and wants more.
AUTO_SCALE = {True: 0.5, False: 3.0}
# lam_end = lam * LAM_END_RATIO unless given (the same validation runs chose it with lam and iters).
LAM_END_RATIO = 0.5


def _real(name, value, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


@dataclass
class ASAGConfig:
    """Everything that defines ASAG guidance.

    The defaults were chosen on the validation split of the digits quality benchmark (README,
    "The demo and the quality benchmark"), across its four settings (a DiT with no CFG, CFG 1.5
    and CFG 3, an unconditional UNet); large text-to-image models have not been measured here.

    scale: ASAG guidance scale ``w_asag`` (>= 0; 0 turns ASAG off). Default None: automatic,
        AUTO_SCALE[cfg] at each step, 0.5 where CFG runs and 3 where it does not.
    scale_end, scale_schedule: the scale's value at the last step and the shape of the way
        there ("constant", "linear", "cosine"); constant by default.
    lam: adversarial strength **at the first step** (>= 0): it falls to ``lam_end`` at the
        last step along ``lam_schedule``, the paper's adaptive schedule, strong early and weaker
        late ("cosine" by default; "constant" keeps ``lam`` throughout and is the "w/o adaptive
        schedule" ablation). lam_end: default ``lam * LAM_END_RATIO``.
    iters: Sinkhorn iterations (>= 0). tau: temperature (> 0).
    start, stop: the fraction of sampling during which ASAG runs, 0 <= start < stop <= 1;
        outside it the extra branch is not computed at all.
    rescale: guidance rescale factor in [0, 1] (Lin et al.), applied after the combination.
    layers: which self-attention layers (see asag.patching.selection); default "mid".
    mode: "batched" (the perturbed branch joins the CFG batch: 1.5x its size with CFG, one
        forward pass) or "sequential" (a second forward pass per step: lower peak memory).
    variant: "sinkhorn" (ASAG). For comparisons and ablations: "noise" (w/o Sinkhorn),
        "identity" (PAG), "blur" (SEG-style, sigma = lam).
    """

    scale: Optional[float] = None
    lam: float = 2.274
    iters: int = 1
    tau: float = 1.0
    lam_end: Optional[float] = None
    lam_schedule: str = "cosine"
    scale_end: Optional[float] = None
    scale_schedule: str = "constant"
    start: float = 0.0
    stop: float = 1.0
    rescale: float = 0.0
    layers: Selection = "mid"
    mode: str = "batched"
    variant: str = "sinkhorn"

    def __post_init__(self):
        if self.scale is not None:
            _real("scale", self.scale, low=0)
        _real("lam", self.lam, low=0)
        _real("tau", self.tau, low=0, low_open=True)
        if isinstance(self.iters, bool) or not isinstance(self.iters, numbers.Integral) or self.iters < 0:
            raise ValueError(f"iters must be an int >= 0, got {self.iters!r}")
        if self.lam_end is None:
            self.lam_end = self.lam * LAM_END_RATIO
        _real("lam_end", self.lam_end, low=0)
        if self.scale_end is None:
            self.scale_end = self.scale
        if self.scale_end is not None:
            _real("scale_end", self.scale_end, low=0)
        for name in ("lam_schedule", "scale_schedule"):
            if getattr(self, name) not in SHAPES:
                raise ValueError(f"{name} must be one of {SHAPES}, got {getattr(self, name)!r}")
        _real("start", self.start, low=0, high=1)
        _real("stop", self.stop, low=0, high=1)
        if not self.start < self.stop:
            raise ValueError(f"start must be < stop (fractions of sampling), got start={self.start}, stop={self.stop}")
        _real("rescale", self.rescale, low=0, high=1)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    def perturbation(self, progress: float, chunks: int = 1, perturbed=(0,), seed: int = 0) -> Perturbation:
        """The attention perturbation at this point of sampling."""
        return Perturbation(chunks, tuple(perturbed), self.lam_at(progress), self.iters, self.tau, self.variant, seed)

    def lam_at(self, progress: float) -> float:
        return Schedule(self.lam, self.lam_end, self.lam_schedule)(progress)

    def scale_at(self, progress: float, cfg: Optional[bool] = None) -> float:
        """The ASAG scale at this point of sampling; ``cfg`` (whether CFG runs at this step)
        picks the automatic scale when ``scale`` is None."""
        if self.scale is not None:
            return Schedule(self.scale, self.scale_end, self.scale_schedule)(progress)
        if cfg is None:
            raise ValueError("ASAGConfig(scale=None) picks its scale by whether CFG runs: pass cfg=True or False")
        start = AUTO_SCALE[bool(cfg)]
        end = start if self.scale_end is None else self.scale_end
        return Schedule(start, end, self.scale_schedule)(progress)

    def active_at(self, progress: float) -> bool:
        """Whether the ASAG branch is computed at this point of sampling (the automatic scale is
        never 0)."""
        if not self.start <= progress <= self.stop:
            return False
        return self.scale is None or self.scale_at(progress) > 0

    def describe_scale(self) -> str:
        if self.scale is None:
            auto = f"auto ({AUTO_SCALE[True]:g} with CFG, {AUTO_SCALE[False]:g} without)"
            return auto if self.scale_end is None else f"{auto} -> {self.scale_end:g} ({self.scale_schedule})"
        return f"{self.scale:g} -> {self.scale_end:g} ({self.scale_schedule})"
