"""Attaching ASAG to a model's self-attention layers: :func:`apply` and its handle."""

from .apply import apply, remove
from .discovery import LayerInfo
from .handle import ASAGHandle
from .perturb import Perturbation
from .registry import register_attention

__all__ = ["ASAGHandle", "LayerInfo", "Perturbation", "apply", "register_attention", "remove"]
