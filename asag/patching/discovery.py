"""Finding attention modules in a model and telling self, cross and joint attention apart.

Static attributes are not trusted (most new diffusers attention classes lack
``is_cross_attention``; CogVideoX's ``attn1`` and Flux's single-stream blocks mix text and
image tokens). A probe forward pass records, per module, the token counts it was given and the
query/key lengths that reached ``scaled_dot_product_attention``; :func:`classify` decides from
those.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

# Processors (or attention classes) that concatenate text and image tokens, by token order.
IMAGE_FIRST = {
    "JointAttnProcessor2_0",
    "FusedJointAttnProcessor2_0",
    "PAGJointAttnProcessor2_0",
    "PAGCFGJointAttnProcessor2_0",
}
TEXT_FIRST = {
    "FluxAttnProcessor",
    "FluxAttnProcessor2_0",
    "FluxAttention",
    "CogVideoXAttnProcessor2_0",
    "FusedCogVideoXAttnProcessor2_0",
}


def _attention_base_classes():
    classes = []
    try:
        from diffusers.models.attention_processor import Attention

        classes.append(Attention)
    except ImportError:
        pass
    try:
        from diffusers.models.attention import AttentionModuleMixin

        classes.append(AttentionModuleMixin)
    except ImportError:
        pass
    try:
        from timm.layers import Attention as TimmAttention

        classes.append(TimmAttention)
    except ImportError:
        pass
    return tuple(classes)


def is_timm_attention(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("timm.") and hasattr(module, "fused_attn")


def find_attention_modules(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """(name, module) of every attention module: diffusers ``Attention`` and
    ``AttentionModuleMixin`` classes, and timm ``Attention`` (nested ones are skipped)."""
    bases = _attention_base_classes()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, bases) and not any(name.startswith(n + ".") for n, _ in found):
            found.append((name, module))
    return found


def processor_name(module: torch.nn.Module) -> str:
    processor = getattr(module, "processor", None)
    return type(processor).__name__ if processor is not None else type(module).__name__


def token_count(t) -> Optional[int]:
    """Tokens in a (B, N, C) sequence or a (B, C, H, W) feature map."""
    if not isinstance(t, torch.Tensor):
        return None
    if t.dim() == 3:
        return t.shape[1]
    if t.dim() == 4:
        return t.shape[2] * t.shape[3]
    return None


@dataclass
class CallRecord:
    """What one forward call of an attention module showed."""

    hidden_tokens: Optional[int]  # tokens of the module's hidden_states input
    text_tokens: Optional[int]  # tokens of its encoder_hidden_states input, if any
    model_text_tokens: Optional[int]  # the model call's encoder_hidden_states tokens
    model_tokens: Optional[int]  # the model call's hidden_states tokens (sequence inputs)
    sdpa: List[Tuple[tuple, tuple]] = field(default_factory=list)  # (q shape, k shape)
    value_check: Optional[str] = None  # "image_first" / "text_first" from matching v rows
    hidden_states: Optional[torch.Tensor] = field(default=None, repr=False)  # during the call


@dataclass
class LayerInfo:
    """One attention module of the model, as asag sees it (``handle.layers`` lists these)."""

    name: str
    module: torch.nn.Module = field(repr=False)
    index: int
    kind: str = "unknown"  # self | joint | cross | unsupported | unknown (not probed yet)
    processor: str = ""
    heads: Optional[int] = None
    head_dim: Optional[int] = None
    tokens: Optional[int] = None  # query tokens seen by SDPA in the probe
    text_tokens: int = 0  # joint: text tokens in the probe
    text_first: Optional[bool] = None  # joint: token order
    single_stream: bool = False  # joint layer whose text comes in the hidden states
    reason: str = ""  # why unsupported

    @property
    def perturbable(self) -> bool:
        return self.kind in ("self", "joint")

    def describe(self) -> str:
        shape = f"{self.heads} heads x {self.tokens} tokens x {self.head_dim}" if self.tokens else "not probed"
        extra = ""
        if self.kind == "joint":
            order = "text first" if self.text_first else "image first"
            extra = f", {self.text_tokens} text tokens, {order}"
        if self.reason:
            extra += f" ({self.reason})"
        return f"{self.name}: {self.kind} [{self.processor}] {shape}{extra}"


def classify(layer: LayerInfo, record: Optional[CallRecord]) -> None:
    """Sets layer.kind (and shape, token order) from the probe's record of its first call."""
    if record is None:
        layer.kind, layer.reason = "unsupported", "not called during the probe forward pass"
        return
    if not record.sdpa and "Linear" in layer.processor:
        layer.kind = "unsupported"
        layer.reason = (
            "linear attention (Sana): it has no softmax over keys for Sinkhorn to replace, and "
            "giving the layer quadratic attention would change what the model computes"
        )
        return
    if not record.sdpa:
        layer.kind = "unsupported"
        layer.reason = (
            f"its processor {layer.processor} never called torch.nn.functional."
            "scaled_dot_product_attention (xformers, sliced, linear attention or a non-native "
            "attention backend); use the native SDPA processor/backend for this model"
        )
        return
    q_shape, k_shape = record.sdpa[0]
    q_len, k_len = q_shape[-2], k_shape[-2]
    layer.heads = q_shape[1] if len(q_shape) == 4 else 1
    layer.head_dim = q_shape[-1]
    layer.tokens = q_len
    h, e = record.hidden_tokens, record.text_tokens
    if q_len != k_len:
        if e is not None and k_len == e:
            layer.kind = "cross"
        else:
            layer.kind, layer.reason = "unsupported", "queries and keys differ in length and the keys are not the text"
        return
    if e is not None and h is not None and q_len == h + e:
        layer.kind, layer.text_tokens = "joint", e
        layer.text_first = _text_first(layer, record)
    elif (
        e is None
        and record.model_text_tokens
        and record.model_tokens
        and h == q_len == record.model_text_tokens + record.model_tokens
    ):
        layer.kind, layer.text_tokens, layer.single_stream = "joint", record.model_text_tokens, True
        layer.text_first = _text_first(layer, None)
    elif h is None or q_len == h:
        layer.kind = "self"
        return
    else:
        layer.kind, layer.reason = "unsupported", f"{q_len} query tokens for {h} input tokens"
        return
    if layer.text_first is None:
        layer.kind, layer.reason = "unsupported", "joint attention whose text/image token order is unknown"


def _text_first(layer: LayerInfo, record: Optional[CallRecord]) -> Optional[bool]:
    names = {layer.processor, type(layer.module).__name__}
    if names & TEXT_FIRST:
        return True
    if names & IMAGE_FIRST:
        return False
    if record is not None and record.value_check is not None:
        return record.value_check == "text_first"
    return None


def value_order(module: torch.nn.Module, hidden_states: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Which end of the joint sequence holds the image tokens, found by projecting the
    module's hidden states with its own ``to_v`` and matching SDPA's value rows."""
    to_v = getattr(module, "to_v", None)
    if to_v is None or hidden_states.dim() != 3 or v.dim() != 4:
        return None
    with torch.no_grad():
        b, n = hidden_states.shape[:2]
        mine = to_v(hidden_states).view(b, n, v.shape[1], v.shape[3]).transpose(1, 2)
    for order, rows in (("image_first", v[:, :, :n]), ("text_first", v[:, :, -n:])):
        if rows.shape == mine.shape and torch.allclose(rows, mine, atol=1e-4, rtol=1e-3):
            return order
    return None
