"""Attention classes asag knows by name, and how to register more.

asag finds attention by what it does: a module is an attention layer when its forward calls
``torch.nn.functional.scaled_dot_product_attention`` during the probe pass. Class knowledge is
only a fast path: it names layers before the probe, reports layers of a known attention class
that never reach SDPA (with the reason), and knows the switch some classes have between a
hand-written softmax and SDPA (timm's ``fused_attn``), which asag turns on while it probes and
perturbs a layer and restores afterwards.

A model whose attention computes softmax by hand can be supported in either of two ways:

- give the class a boolean switch to an SDPA path and register it:
  ``asag.register_attention(MyAttention, sdpa_flag="use_sdpa")``;
- or make its forward call ``torch.nn.functional.scaled_dot_product_attention`` (the usual
  one-line change from ``softmax(q @ k.transpose(-2, -1) * scale) @ v``); asag then finds it
  with no registration at all.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch


@dataclass(frozen=True)
class AttentionClass:
    """One entry of the registry: which modules it covers and their SDPA switch, if any."""

    name: str
    matches: Callable[[torch.nn.Module], bool]
    sdpa_flag: Optional[str] = None  # bool attribute that routes the module through SDPA


_REGISTRY: List[AttentionClass] = []


def register_attention(
    cls: Union[type, Callable[[torch.nn.Module], bool]], *, sdpa_flag: Optional[str] = None, name: Optional[str] = None
) -> None:
    """Declares modules of class ``cls`` (or for which the predicate ``cls(module)`` is True)
    attention layers for :func:`asag.apply`.

    Args:
        cls: an ``nn.Module`` subclass (or a mixin attention modules inherit), or a predicate
            on modules.
        sdpa_flag: the name of a boolean attribute that, when True, makes the module compute
            its attention with ``torch.nn.functional.scaled_dot_product_attention`` (timm's
            ``fused_attn``). asag sets it to True while it probes or perturbs the module and
            restores the previous value afterwards, exceptions and interrupts included.
        name: how error messages call this class (default: its ``__name__``).
    """
    if isinstance(cls, type):  # a module class, or a mixin that attention modules inherit
        matches, label = (lambda module, c=cls: isinstance(module, c)), cls.__name__
    elif callable(cls):
        matches, label = cls, getattr(cls, "__name__", "predicate")
    else:
        raise TypeError(f"register_attention expects an nn.Module subclass or a predicate, got {cls!r}")
    if sdpa_flag is not None and not isinstance(sdpa_flag, str):
        raise TypeError(f"sdpa_flag must be an attribute name (str), got {sdpa_flag!r}")
    _REGISTRY.insert(0, AttentionClass(name or label, matches, sdpa_flag))  # newest wins


def lookup(module: torch.nn.Module) -> Optional[AttentionClass]:
    """The registry entry covering ``module``, or None."""
    for entry in _REGISTRY:
        if entry.matches(module):
            return entry
    return None


def _is_timm_attention(module: torch.nn.Module) -> bool:
    # timm's Attention, EvaAttention, AttentionRope, ...: every timm attention with a choice
    # between SDPA and a manual softmax exposes it as ``fused_attn``.
    return type(module).__module__.startswith("timm.") and isinstance(getattr(module, "fused_attn", None), bool)


def _register_builtins() -> None:
    register_attention(_is_timm_attention, sdpa_flag="fused_attn", name="timm attention")
    try:
        from diffusers.models.attention import AttentionModuleMixin

        register_attention(AttentionModuleMixin)
    except ImportError:
        pass
    try:
        from diffusers.models.attention_processor import Attention

        register_attention(Attention)
    except ImportError:
        pass


_register_builtins()
