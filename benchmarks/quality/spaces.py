"""What the quality benchmark tunes: the settings it judges methods in (regimes), each method's
own knobs, and the equal-budget search over them.

Every method draws the same number of candidates (``budget``) from its own knob space by Latin
hypercube sampling, so a method with more knobs gets no more tries than one with fewer: each
candidate is one validation run. The candidates are the same in every regime (a point of the
unit cube maps to the same knob values; the layer choice maps to the model's own four options).
"""

import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List

from asag.guidance import ASAGConfig


@dataclass(frozen=True)
class Regime:
    """Where methods are judged: a model and the CFG scale every method runs with (1: none)."""

    kind: str  # "dit" (class-conditional) or "unet" (unconditional)
    cfg_scale: float
    title: str

    @property
    def cfg_on(self) -> bool:
        return self.kind == "dit" and self.cfg_scale > 1


REGIMES = [
    Regime("dit", 1.0, "DiT, no CFG"),
    Regime("dit", 1.5, "DiT, CFG 1.5"),
    Regime("dit", 3.0, "DiT, CFG 3"),
    Regime("unet", 1.0, "UNet, unconditional"),
]

# Each model's four layer choices, in the same order for both (a candidate's layer knob picks
# the same position in each list).
LAYERS = {
    "dit": [("mid", "mid"), ("all", "all"), ("blocks 0-2", [0, 1, 2]), ("blocks 3-5", [3, 4, 5])],
    "unet": [("mid", "mid"), ("all", "all"), ("down", "down"), ("up", "up")],
}


def log_range(low: float, high: float) -> Callable[[float], float]:
    return lambda u: round(low * (high / low) ** u, 3)


def linear_range(low: float, high: float) -> Callable[[float], float]:
    return lambda u: round(low + (high - low) * u, 3)


def choice(options) -> Callable[[float], object]:
    return lambda u: options[min(int(u * len(options)), len(options) - 1)]


SCALE = log_range(0.25, 8.0)
LAYER_INDEX = choice(range(4))
ITERS = choice([1, 3, 5, 10])
LAM = log_range(0.5, 16.0)


# Every field a family does not set, pinned here rather than taken from ASAGConfig's defaults:
# the defaults are chosen from this benchmark, and the cached runs are keyed by every field.
BASE = dict(iters=5, tau=1.0, lam_schedule="cosine", scale_schedule="constant", start=0.0, stop=1.0,
            rescale=0.0, mode="batched")


@dataclass
class Family:
    """A guidance method: the settings that define it and the knobs it is tuned over."""

    name: str
    fixed: Dict = field(default_factory=dict)
    knobs: Dict[str, Callable[[float], object]] = field(default_factory=dict)

    def settings(self, point: List[float]) -> Dict:
        """The knob values at a point of the unit cube (layers as an index into LAYERS)."""
        return {name: knob(u) for (name, knob), u in zip(self.knobs.items(), point)}

    def config(self, kind: str, settings: Dict) -> ASAGConfig:
        values = dict(BASE, **self.fixed, **settings)
        values["layers"] = LAYERS[kind][values["layers"]][1]
        values["lam_end"] = values.get("lam_end", values["lam"] * values.pop("lam_end_ratio", 0.25))
        return ASAGConfig(**values)

    def candidates(self, budget: int) -> List[Dict]:
        from scipy.stats import qmc

        sampler = qmc.LatinHypercube(d=len(self.knobs), seed=zlib.crc32(self.name.encode()))
        return [self.settings(list(point)) for point in sampler.random(budget)]


FAMILIES = [
    Family("PAG", dict(variant="identity", lam=0.0), dict(scale=SCALE, layers=LAYER_INDEX)),
    Family("SEG (blur)", dict(variant="blur", lam_schedule="constant"),
           dict(scale=SCALE, layers=LAYER_INDEX, lam=log_range(0.5, 10.0))),
    Family("ASAG", dict(variant="sinkhorn", lam_schedule="cosine"),
           dict(scale=SCALE, layers=LAYER_INDEX, lam=LAM, lam_end_ratio=choice([0.1, 0.25, 0.5]), iters=ITERS)),
    Family("ASAG w/o Sinkhorn (noise)", dict(variant="noise", iters=0, lam_schedule="constant"),
           dict(scale=SCALE, layers=LAYER_INDEX, lam=log_range(0.1, 4.0))),
    Family("ASAG w/o adversarial cost", dict(variant="sinkhorn", lam=0.0, lam_end=0.0),
           dict(scale=SCALE, layers=LAYER_INDEX, iters=ITERS)),
    Family("ASAG w/o adaptive schedule", dict(variant="sinkhorn", lam_schedule="constant"),
           dict(scale=SCALE, layers=LAYER_INDEX, lam=LAM, iters=ITERS)),
]
FAMILY = {f.name: f for f in FAMILIES}

# CFG alone is tuned over its own scale with the same budget (the DiT only).
CFG_SCALE = linear_range(1.25, 6.0)


def cfg_candidates(budget: int) -> List[float]:
    from scipy.stats import qmc

    sampler = qmc.LatinHypercube(d=1, seed=zlib.crc32(b"CFG"))
    return sorted(CFG_SCALE(u) for (u,) in sampler.random(budget))


def describe(kind: str, settings: Dict) -> str:
    """Knob values for a table cell: ``scale 1.2, layers all, lam 3.1``."""
    parts = []
    for name, value in settings.items():
        if name == "layers":
            value = LAYERS[kind][value][0]
        parts.append(f"{name.replace('lam_end_ratio', 'lam_end/lam')} {value}")
    return ", ".join(parts)
