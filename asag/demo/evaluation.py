"""Running guidance methods on the shipped models and scoring their samples: shared by
``asag demo`` and ``benchmarks/quality/run.py``."""

import json
import os
import time
from typing import Dict, List, Optional

import torch

from ..guidance import ASAGConfig
from . import data, metrics, models
from .sampling import Method, sample

TUNED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned.json")
# The settings the demo shows, from the quality benchmark's validation split (tuned.json is
# written by benchmarks/quality/run.py): the DiT with CFG 1.5 (on this small model CFG alone does
# best near 1.9, and 3 overshoots), the UNet unconditional.
DEMO_REGIME = {"dit": ("DiT, CFG 1.5", 1.5), "unet": ("UNet, unconditional", 1.0)}


def tuned_settings() -> Dict:
    with open(TUNED_PATH) as f:
        return json.load(f)


def comparison_methods(kind: str) -> List[Method]:
    """The demo's methods on one model: no guidance, CFG (the DiT), then PAG, SEG-style blur
    and ASAG, each with the settings chosen for it on the benchmark's validation split, and
    ASAG with asag's defaults; the perturbations on top of CFG for the DiT."""
    regime, cfg = DEMO_REGIME[kind]
    tuned = tuned_settings()["demo"][regime]
    plus = f"CFG {cfg:g} + " if cfg > 1 else ""
    methods = [Method("no guidance")] + ([Method(f"CFG {cfg:g}", cfg)] if cfg > 1 else [])
    for name in ("PAG", "SEG (blur)", "ASAG"):
        methods.append(Method(plus + name + " (tuned)", cfg, ASAGConfig(**tuned[name])))
    methods.append(Method(plus + "ASAG (defaults)", cfg, ASAGConfig()))
    return methods


class Bench:
    """The shipped models, the classifier and the held-out reference images."""

    def __init__(self):
        self.dit, self.dit_meta = models.load("dit")
        self.unet, self.unet_meta = models.load("unet")
        self.classifier, self.classifier_meta = models.load("classifier")
        _, _, self.reference, self.reference_labels = data.load_digits_split(self.dit_meta["seed"])
        (self.validation_reference, _), (self.test_reference, _) = data.held_out_splits(self.dit_meta["seed"])

    def model(self, kind: str):
        return self.dit if kind == "dit" else self.unet

    def run(self, kind: str, method: Method, n: int, seed: int, steps: int, progress=None, reference=None) -> Dict:
        """Samples n images with `method` and scores them against ``reference`` (default: all
        held-out digits): metrics plus time, evaluations and the perturbation's size."""
        conditional = kind == "dit"
        labels = torch.arange(n) % 10 if conditional else None
        start = time.perf_counter()
        sizes = {}
        images = sample(self.model(kind), method, n, seed, steps, labels=labels,
                        null_label=self.dit.num_classes if conditional else None, progress=progress, stats=sizes)
        seconds = time.perf_counter() - start
        scores = metrics.evaluate(self.classifier, images, reference if reference is not None else self.reference, labels)
        scores.update(seconds=seconds, evaluations=method.evaluations(conditional) * steps, **sizes)
        return {"images": images, **scores}

    def real_baseline(self, n: Optional[int] = None, reference=None) -> Dict:
        """The metrics of real training digits against held-out ones (default: all): the floor."""
        x, y, _, _ = data.load_digits_split(self.dit_meta["seed"])
        reference = self.reference if reference is None else reference
        n = n or len(reference)
        return metrics.evaluate(self.classifier, x[:n], reference, y[:n])
