"""``asag.apply(model)``: attach ASAG's Sinkhorn attention to a model's self-attention layers."""


import torch

from .discovery import LayerInfo, find_attention_modules, is_timm_attention, processor_name
from .handle import ASAGHandle, existing_handle
from .selection import Selection, select_layers


def _static_layers(model: torch.nn.Module):
    layers = []
    for index, (name, module) in enumerate(find_attention_modules(model)):
        layer = LayerInfo(name=name, module=module, index=index, processor=processor_name(module))
        if is_timm_attention(module):  # timm's Attention is self-attention by construction
            layer.kind, layer.processor = "self", "timm Attention"
            layer.heads, layer.head_dim = module.num_heads, module.head_dim
        elif getattr(module, "is_cross_attention", False):
            layer.kind = "cross"
        layers.append(layer)
    return layers


def apply(model: torch.nn.Module, layers: Selection = "mid", *, example_inputs=None) -> ASAGHandle:
    """Attaches ASAG to the self-attention layers of ``model`` and returns the handle.

    Works on diffusers UNets and transformers (SD1.5/SDXL UNets, UNet2DModel, DiT, PixArt,
    SD3/SD3.5, Flux, HunyuanDiT, Wan, CogVideoX, LTX-Video) and on models built from timm's
    ``Attention`` (the original DiT code). Until a guidance block is active
    (``with handle.guidance(...)``) the model computes exactly what it did before.

    Args:
        model: the denoiser (``pipe.unet`` or ``pipe.transformer``, or any nn.Module).
        layers: which layers to perturb; see :mod:`asag.patching.selection`. Default
            ``"mid"``: the middle self-attention layer(s), as diffusers' PAG.
        example_inputs: inputs for one probe forward pass that classifies every attention
            layer as self, cross or joint: a dict of keyword arguments, a tuple of positional
            ones, or ``(args, kwargs)``. Without it, the first guided forward pass probes
            first (one extra forward pass, once). Models built only from timm attention
            need no probe.

    Returns:
        an :class:`ASAGHandle`. Applying again to the same model returns the same handle
        with the new selection (never a second set of hooks). ``handle.remove()``, or
        ``with asag.apply(model) as handle:``, restores the model exactly, exceptions included.

    Raises:
        ValueError: no attention layer found, or ``layers`` selects none that ASAG can
            perturb (the message lists every attention layer with its kind).
    """
    handle = existing_handle(model)
    if handle is not None:
        handle.select(layers)
        if example_inputs is not None:
            handle.probe(*_split_inputs(example_inputs)[0], **_split_inputs(example_inputs)[1])
        return handle
    found = _static_layers(model)
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
        raise ValueError(
            f"asag.apply found no attention module it can patch in {type(model).__name__} "
            f"(looked for diffusers Attention/AttentionModuleMixin and timm Attention; "
            f"attention-like classes present: {kinds or 'none'})"
        )
    handle = ASAGHandle(model, found, layers)
    select_layers(found, layers, require_kind=False)  # names that match nothing fail now
    handle._install()
    try:
        if example_inputs is not None:
            args, kwargs = _split_inputs(example_inputs)
            handle.probe(*args, **kwargs)
        elif all(layer.kind != "unknown" for layer in found):
            handle.resolved = True
            handle.select(layers)
    except Exception:
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
    handle = existing_handle(model)
    if handle is not None:
        handle.remove()
