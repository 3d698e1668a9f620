"""``asag.apply(model)``: attach ASAG's Sinkhorn attention to a model's self-attention layers."""

import torch

from . import registry
from .discovery import static_layers
from .handle import ASAGHandle, existing_handle
from .selection import Selection, select_layers


def unwrap(model) -> torch.nn.Module:
    """The module to patch: ``torch.compile`` wrappers are looked through (their layer names
    stay those of the model); anything that is not a module is refused with a hint."""
    if isinstance(model, torch.nn.Module):
        inner = getattr(model, "_orig_mod", None)  # torch.compile(model) returns an OptimizedModule
        return inner if isinstance(inner, torch.nn.Module) else model
    denoisers = [n for n in ("unet", "transformer") if isinstance(getattr(model, n, None), torch.nn.Module)]
    if denoisers:
        raise TypeError(
            f"asag.apply takes the denoiser module, not a {type(model).__name__}: use "
            + " or ".join(f"asag.apply(pipe.{n})" for n in denoisers)
            + ", or asag.enable(pipe) to turn ASAG guidance on in the pipeline itself"
        )
    raise TypeError(f"asag.apply takes a torch.nn.Module (the denoiser), got {type(model).__name__}")


def _looks_like_attention(model: torch.nn.Module) -> bool:
    return any("attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower() for m in model.modules())


def apply(model: torch.nn.Module, layers: Selection = "mid", *, example_inputs=None) -> ASAGHandle:
    """Attaches ASAG to the self-attention layers of ``model`` and returns the handle.

    Works on any model whose attention calls ``torch.nn.functional.scaled_dot_product_attention``:
    diffusers UNets and transformers, timm models, and custom modules alike (asag finds
    attention by what runs, see :mod:`asag.patching.discovery`). Until a guidance block is
    active (``with handle.guidance(...)``) the model computes exactly what it did before.

    Args:
        model: the denoiser (``pipe.unet`` or ``pipe.transformer``, or any nn.Module;
            a ``torch.compile`` wrapper is looked through).
        layers: which layers to perturb; see :mod:`asag.patching.selection`. Default
            ``"mid"``: the middle self-attention layer(s), as diffusers' PAG.
        example_inputs: inputs for the probe that finds and classifies every attention layer
            (self, cross, joint, text-only, temporal): a dict of keyword arguments, a tuple of
            positional ones, or ``(args, kwargs)``. Without it, the first guided forward pass
            probes first (two extra forward passes, once per input shape).

    Returns:
        an :class:`ASAGHandle`. Applying again to the same model returns the same handle
        with the new selection (never a second set of hooks). ``handle.remove()``, or
        ``with asag.apply(model) as handle:``, restores the model exactly, exceptions included.

    Raises:
        TypeError: ``model`` is not a module (for a pipeline, the message names its denoiser).
        ValueError: no attention layer found, or ``layers`` selects none that ASAG can
            perturb (the message lists every attention layer with its kind).
    """
    model = unwrap(model)
    handle = existing_handle(model)
    if handle is not None:
        handle.select(layers)
        if example_inputs is not None:
            args, kwargs = _split_inputs(example_inputs)
            handle.probe(*args, **kwargs)
        return handle
    found = static_layers(model)
    if not found and example_inputs is None and not _looks_like_attention(model):
        raise ValueError(
            f"asag.apply found no attention module in {type(model).__name__} (no registered attention "
            "class and no module named like attention). asag finds attention by what runs: pass "
            "example_inputs=... so that it can probe the model for modules that call "
            "torch.nn.functional.scaled_dot_product_attention"
        )
    if found:
        select_layers(found, layers, require_kind=False)  # names that match nothing fail now
    handle = ASAGHandle(model, found, layers)
    handle._install()
    try:
        if example_inputs is not None:
            args, kwargs = _split_inputs(example_inputs)
            handle.probe(*args, **kwargs)
        elif found and all(registry.lookup(l.module).name == "timm attention" for l in found):
            for layer in found:  # timm's attention classes are self-attention by construction
                layer.kind, layer.rule = "self", "timm attention"
                layer.heads, layer.head_dim = getattr(layer.module, "num_heads", None), getattr(layer.module, "head_dim", None)
            handle.resolved = True
            handle.select(layers)
    except BaseException:
        handle.remove()  # never leave a model half-patched
        raise
    return handle


def _split_inputs(example_inputs):
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list))
        and isinstance(example_inputs[1], dict)
    ):
        return tuple(example_inputs[0]), example_inputs[1]
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def remove(model: torch.nn.Module) -> None:
    """Removes asag from ``model`` if it is applied (same as ``handle.remove()``)."""
    handle = existing_handle(unwrap(model))
    if handle is not None:
        handle.remove()
