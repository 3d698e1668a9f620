"""Schedules over sampling progress (0 at the first step, 1 at the last).

``value(p) = start + (end - start) * shape(p)`` with shape ``constant`` (0), ``linear`` (p) or
``cosine`` ((1 - cos(pi p)) / 2: flat at both ends, steepest mid-way). The paper's adaptive
schedule is strong early (global layout) and weaker late (details): a decreasing ``lam``.
"""

import math
from dataclasses import dataclass

SHAPES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    start: float
    end: float
    shape: str = "constant"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"schedule must be one of {SHAPES}, got {self.shape!r}")

    def __call__(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        if self.shape == "constant":
            return self.start
        weight = p if self.shape == "linear" else (1.0 - math.cos(math.pi * p)) / 2.0
        return self.start + (self.end - self.start) * weight
