"""Running guidance methods on the shipped models and scoring their samples: shared by
``asag demo`` and ``benchmarks/quality/run.py``."""

import time
from typing import Dict, List, Optional

import torch

from ..guidance import ASAGConfig
from . import data, metrics, models
from .sampling import Method, sample

# The demo's and benchmark's guidance settings, chosen by the sweeps of
# benchmarks/quality/run.py (README: "The demo and the quality benchmark"). Every perturbation
# acts on the same layers ("mid") with the same CFG scale, so the comparison is like for like.
CFG_SCALE = 1.5
ASAG = dict(scale=2.0, lam=4.0, iters=5, layers="mid")
PAG_SCALE = 1.0
SEG_SIGMA = 2.0


def asag_method(name="ASAG", cfg_scale=1.0, **overrides) -> Method:
    settings = {**ASAG, **overrides}
    return Method(name, cfg_scale, ASAGConfig(**settings))


def comparison_methods(conditional: bool, cfg_scale: float = CFG_SCALE) -> List[Method]:
    """No guidance, CFG (conditional only), PAG, SEG-style blur and ASAG, each perturbation on
    top of CFG for the conditional model."""
    cfg = cfg_scale if conditional else 1.0
    plus = "CFG + " if conditional else ""
    methods = [Method("no guidance")]
    if conditional:
        methods.append(Method("CFG", cfg))
    methods += [
        Method(plus + "PAG", cfg, ASAGConfig(scale=PAG_SCALE, variant="identity", lam=0.0)),
        Method(plus + "SEG (blur)", cfg, ASAGConfig(scale=PAG_SCALE, variant="blur", lam=SEG_SIGMA, lam_schedule="constant")),
        asag_method(plus + "ASAG", cfg),
    ]
    return methods


def ablation_methods(conditional: bool, cfg_scale: float = CFG_SCALE) -> List[Method]:
    """The paper's ablations of ASAG (docs/method.md section 3)."""
    cfg = cfg_scale if conditional else 1.0
    plus = "CFG + " if conditional else ""
    return [
        asag_method(plus + "ASAG w/o Sinkhorn (noise)", cfg, variant="noise", iters=0, lam_schedule="constant"),
        asag_method(plus + "ASAG w/o adversarial cost", cfg, lam=0.0, lam_end=0.0),
        asag_method(plus + "ASAG w/o adaptive schedule", cfg, lam_schedule="constant"),
    ]


class Bench:
    """The shipped models, the classifier and the held-out reference images."""

    def __init__(self):
        self.dit, self.dit_meta = models.load("dit")
        self.unet, self.unet_meta = models.load("unet")
        self.classifier, self.classifier_meta = models.load("classifier")
        _, _, self.reference, self.reference_labels = data.load_digits_split(self.dit_meta["seed"])

    def model(self, kind: str):
        return self.dit if kind == "dit" else self.unet

    def run(self, kind: str, method: Method, n: int, seed: int, steps: int, progress=None) -> Dict:
        """Samples n images with `method` and scores them: metrics plus time and evaluations."""
        conditional = kind == "dit"
        labels = torch.arange(n) % 10 if conditional else None
        start = time.perf_counter()
        images = sample(self.model(kind), method, n, seed, steps, labels=labels,
                        null_label=self.dit.num_classes if conditional else None, progress=progress)
        seconds = time.perf_counter() - start
        scores = metrics.evaluate(self.classifier, images, self.reference, labels)
        scores.update(seconds=seconds, evaluations=method.evaluations(conditional) * steps)
        return {"images": images, **scores}

    def real_baseline(self, n: Optional[int] = None) -> Dict:
        """The metrics of real training digits against the held-out ones: the floor."""
        x, y, _, _ = data.load_digits_split(self.dit_meta["seed"])
        n = n or len(self.reference)
        return metrics.evaluate(self.classifier, x[:n], self.reference, y[:n])
