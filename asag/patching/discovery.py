"""Which modules are attention layers, of which kind, and where their text tokens are.

A module is an attention layer when its forward called ``scaled_dot_product_attention`` in the
probe pass (:mod:`asag.patching.probe`), whatever its class; registered classes that never did
are listed too, as unsupported, with the reason. Each layer's kind comes from the first rule
of :data:`RULES` that fits what the probe saw, tried in the order the layers ran:

=====  ==========  ===========================================================================
kind   text rows   when
=====  ==========  ===========================================================================
text   all         no query row changed when the image input changed (text refiners, poolers)
joint  keys only   the keys are the module's own tokens joined by added text keys (Kandinsky,
                   DeepFloyd IF: AttnAddedKV processors)
cross  -           queries and keys differ in length (attention to text or another sequence)
tempo  -           a video model's attention across its frames (few tokens, many sequences)
joint  by the cat  the module was handed text, and concatenated it with its own tokens
joint  by the cat  the sequence was built by concatenating a known image stream with other
                   tokens before the module ran (single-stream blocks)
joint  by rows     a contiguous block of query rows did not change with the image input, and
                   the rows that did are as many as a known image stream
joint  inherited   an earlier layer's joint sequence of the same length (the same stream)
self   -           as many tokens as the module was given, with no text merged in
=====  ==========  ===========================================================================

Anything else is "unsupported", with the reason; :func:`asag.apply` warns about those.
Self and joint layers are perturbed by the presets; temporal layers only when named.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from .probe import Cat, ModuleCall, ProbePass
from .registry import lookup

PERTURBABLE = ("self", "joint", "temporal")


@dataclass
class LayerInfo:
    """One attention module of the model, as asag sees it (``handle.layers`` lists these)."""

    name: str
    module: torch.nn.Module = field(repr=False)
    index: int
    kind: str = "unknown"  # self | joint | cross | text | temporal | unsupported | unknown
    processor: str = ""
    heads: Optional[int] = None
    head_dim: Optional[int] = None
    tokens: Optional[int] = None  # query tokens seen by SDPA in the probe
    text_tokens: int = 0  # joint: text tokens in the probe
    text_first: Optional[bool] = None  # joint: token order
    single_stream: bool = False  # joint layer handed one sequence (its image count is fixed)
    text_queries: bool = True  # joint: the text tokens are queries too (not only added keys)
    image_tokens: Optional[int] = None  # joint, single stream: image tokens in the sequence
    rule: str = ""  # which rule classified it
    reason: str = ""  # why unsupported

    @property
    def perturbable(self) -> bool:
        return self.kind in PERTURBABLE

    def describe(self) -> str:
        shape = f"{self.heads} heads x {self.tokens} tokens x {self.head_dim}" if self.tokens else "not probed"
        extra = ""
        if self.kind == "joint":
            order = "text first" if self.text_first else "image first"
            keys = "" if self.text_queries else " added as keys only"
            extra = f", {self.text_tokens} text tokens{keys}, {order}"
        if self.reason:
            extra += f" ({self.reason})"
        return f"{self.name}: {self.kind} [{self.processor}] {shape}{extra}"


def processor_name(module: torch.nn.Module) -> str:
    processor = getattr(module, "processor", None)
    return type(processor).__name__ if processor is not None else type(module).__name__


def static_layers(model: torch.nn.Module) -> List[LayerInfo]:
    """The modules of registered attention classes (outermost ones), before any probe."""
    found: List[LayerInfo] = []
    for name, module in model.named_modules():
        if lookup(module) is not None and not any(name.startswith(l.name + ".") for l in found):
            found.append(LayerInfo(name, module, len(found), processor=processor_name(module)))
    return found


# ---- the rules ---------------------------------------------------------------------------


@dataclass
class _Context:
    """What the layers classified so far tell about the model's token streams."""

    sample_shape: Optional[tuple]
    image_counts: Set[int] = field(default_factory=set)
    sequences: Dict[int, Tuple[bool, int]] = field(default_factory=dict)  # length -> (image first, n)
    cats: List[Cat] = field(default_factory=list)


def _joint(layer, image_first: bool, image_tokens: int, q_len: int, single: bool, rule: str, ctx: _Context):
    layer.kind, layer.rule = "joint", rule
    layer.text_first, layer.text_tokens = not image_first, q_len - image_tokens
    layer.single_stream, layer.image_tokens = single, image_tokens
    ctx.image_counts.add(image_tokens)
    ctx.sequences[q_len] = (image_first, image_tokens)
    return True


def _rule_cross(layer, call, q_len, k_len, rows, ctx):
    if q_len == k_len:
        return False
    for cat in call.cats:  # the module's own tokens joined by added text keys: joint
        if sum(cat.lengths) == k_len and k_len > q_len and q_len in (cat.lengths[0], cat.lengths[-1]):
            text_first = cat.lengths[-1] == q_len
            layer.kind, layer.rule = "joint", "its own tokens as keys, with added text keys and values"
            layer.text_first, layer.text_tokens, layer.text_queries = text_first, k_len - q_len, False
            layer.image_tokens = q_len
            return True
    layer.kind, layer.rule = "cross", "queries and keys differ in length"
    return True


def _rule_text(layer, call, q_len, k_len, rows, ctx):
    if rows is not None and not bool(rows.any()):
        layer.kind, layer.rule = "text", "no query row depends on the image input"
        return True
    return False


def _rule_temporal(layer, call, q_len, k_len, rows, ctx):
    # A video sample is (B, C, F, H, W) (AnimateDiff, most video UNets) or (B, F, C, H, W)
    # (Stable Video Diffusion): the frame count is one of dims 1 and 2. Attention across frames
    # has the frames as tokens and one sequence per pixel (batch B * pixels); spatial attention
    # has one sequence per frame (batch B * F), so its batch names a frame count instead.
    shape = ctx.sample_shape
    if shape is None or len(shape) != 5:
        return False
    q_batch, frame_dims = call.sdpa[0].q_shape[0], (shape[1], shape[2])
    sequences = q_batch // shape[0] if q_batch % shape[0] == 0 else None
    if q_len in frame_dims and q_batch > shape[0] and sequences not in frame_dims:
        layer.kind, layer.rule = "temporal", "attention across the frames of a video"
        return True
    return False


def _rule_module_cat(layer, call, q_len, k_len, rows, ctx):
    h, e = call.hidden_tokens, call.text_tokens
    if e is None or h is None:
        return False
    for cat in call.cats:
        if sum(cat.lengths) != q_len:
            continue
        first, last = cat.lengths[0], cat.lengths[-1]
        if first == h and sum(cat.lengths[1:]) <= e:
            return _joint(layer, True, h, q_len, False, "text handed to the module, concatenated after its tokens", ctx)
        if last == h and sum(cat.lengths[:-1]) <= e:
            return _joint(layer, False, h, q_len, False, "text handed to the module, concatenated before its tokens", ctx)
    if q_len == h + e:
        layer.kind, layer.reason = "unsupported", "joint attention whose text/image token order could not be seen"
        return True
    return False


def _rule_rows(layer, call, q_len, k_len, rows, ctx):
    if rows is None or bool(rows.all()):
        return False
    image = rows.nonzero().flatten()
    n = len(image)
    if ctx.image_counts and n not in ctx.image_counts:
        return False  # text rows already mixed with the image also depend on it: no clean split
    if int(image[0]) == 0 and int(image[-1]) == n - 1:
        return _joint(layer, True, n, q_len, True, "image rows first, then rows that do not depend on the image", ctx)
    if int(image[0]) == q_len - n and int(image[-1]) == q_len - 1:
        return _joint(layer, False, n, q_len, True, "rows that do not depend on the image, then the image rows", ctx)
    layer.kind, layer.reason = "unsupported", "image and non-image query rows interleave"
    return True


def _expand(cat: Cat, cats: List[Cat]) -> List[int]:
    """A cat's pieces, with pieces that were themselves built by an earlier cat expanded."""
    pieces = []
    for length in cat.lengths:
        inner = next((c for c in reversed(cats) if c.order < cat.order and c.batch == cat.batch and sum(c.lengths) == length), None)
        pieces += _expand(inner, cats) if inner is not None else [length]
    return pieces


def _rule_model_cat(layer, call, q_len, k_len, rows, ctx):
    before = [c for c in ctx.cats if c.order < call.order and c.batch == call.batch]
    cat = next((c for c in reversed(before) if sum(c.lengths) == q_len), None)
    if cat is None:
        return False
    pieces = _expand(cat, before)
    if len(pieces) < 2:
        return False
    if pieces[0] in ctx.image_counts:
        return _joint(layer, True, pieces[0], q_len, True, "sequence built as image tokens, then others", ctx)
    if pieces[-1] in ctx.image_counts:
        return _joint(layer, False, pieces[-1], q_len, True, "sequence built as other tokens, then image tokens", ctx)
    return False


def _rule_inherited(layer, call, q_len, k_len, rows, ctx):
    if q_len in ctx.sequences:
        image_first, n = ctx.sequences[q_len]
        return _joint(layer, image_first, n, q_len, True, "same sequence as an earlier joint layer", ctx)
    return False


def _rule_self(layer, call, q_len, k_len, rows, ctx):
    h = call.hidden_tokens
    windowed = call.batch is not None and call.sdpa[0].q_shape[0] > call.batch  # tokens split into windows
    if h is None or q_len == h or windowed:
        layer.kind, layer.rule = "self", "as many tokens as the module was given, no text merged in"
        ctx.image_counts.add(q_len)
        return True
    layer.kind, layer.reason = "unsupported", f"{q_len} query tokens for {h} input tokens"
    return True


RULES = (_rule_text, _rule_cross, _rule_temporal, _rule_module_cat, _rule_model_cat, _rule_rows, _rule_inherited, _rule_self)


def _no_sdpa_reason(layer: LayerInfo, call: Optional[ModuleCall]) -> str:
    if call is None:
        return "not called during the probe forward pass"
    if call.softmax:
        return (
            f"its processor {layer.processor} never called torch.nn.functional.scaled_dot_product_attention "
            "(it computes softmax by hand, as sliced, xformers-free manual or older processors do); use the "
            "native SDPA processor/backend, or see asag.register_attention"
        )
    if "Linear" in layer.processor or "linear" in layer.processor:
        return (
            "linear attention (Sana): it has no softmax over keys for Sinkhorn to replace, and giving the "
            "layer quadratic attention would change what the model computes"
        )
    return (
        f"its processor {layer.processor} never called torch.nn.functional.scaled_dot_product_attention "
        "(xformers, linear attention or a non-native attention backend); use the native SDPA "
        "processor/backend for this model"
    )


def classify(model: torch.nn.Module, base: ProbePass, dependence: Dict[str, list]) -> List[LayerInfo]:
    """Every attention layer of ``model`` (registered classes and modules that called SDPA),
    in module order, classified by :data:`RULES`."""
    static = {l.name: l for l in static_layers(model)}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = set(static) | {c.name for c in base.attention_calls()}
    layers = {}
    for name in sorted(names, key=lambda n: order.get(n, 0)):
        module = static[name].module if name in static else model.get_submodule(name)
        layers[name] = LayerInfo(name, module, 0, processor=processor_name(module))
    ctx = _Context(base.sample_shape, cats=base.cats)
    if base.sample_shape is not None and len(base.sample_shape) == 3:
        ctx.image_counts.add(base.sample_shape[1])  # a sequence input: its tokens are the image
    for call in base.attention_calls():
        layer = layers[call.name]
        first = call.sdpa[0]
        q_len, k_len = first.q_shape[-2], first.k_shape[-2]
        layer.heads = first.q_shape[1] if len(first.q_shape) == 4 else 1
        layer.head_dim, layer.tokens = first.q_shape[-1], q_len
        rows = (dependence.get(call.name) or [None])[0]
        for rule in RULES:
            if rule(layer, call, q_len, k_len, rows, ctx):
                break
    for layer in layers.values():
        if layer.kind == "unknown":
            layer.kind, layer.reason = "unsupported", _no_sdpa_reason(layer, base.calls.get(layer.name))
    result = list(layers.values())
    for i, layer in enumerate(result):
        layer.index = i
    return result


def softmax_modules(base: ProbePass) -> List[str]:
    """Modules that computed a softmax by hand in the probe (for error messages)."""
    return [c.name for c in base.calls.values() if c.softmax and not c.sdpa]
