"""ASAG guidance: the combination, schedules, and its use in diffusers pipelines, diffusers
guiders and hand-written sampling loops."""

from .config import ASAGConfig
from .formula import combine, rescale
from .pipeline import PipelineGuidance, disable, enable
from .sampling import guided_prediction
from .schedule import Schedule


def __getattr__(name):
    if name == "AdversarialSinkhornGuidance":  # imports diffusers' guider machinery lazily
        from .diffusers_guider import AdversarialSinkhornGuidance

        return AdversarialSinkhornGuidance
    raise AttributeError(name)


__all__ = [
    "ASAGConfig",
    "AdversarialSinkhornGuidance",
    "PipelineGuidance",
    "Schedule",
    "combine",
    "disable",
    "enable",
    "guided_prediction",
    "rescale",
]
