"""The probe: forward passes that show what every attention module of a model does.

While it runs, every module is hooked (a stack of the modules currently running) and a
``TorchFunctionMode`` records three things:

- each call of ``scaled_dot_product_attention``, with the shapes of q and k, owned by the
  innermost running module that is an attention module (a registered class, else the innermost
  module that did not receive q itself);
- each concatenation along a token dimension (``torch.cat``), inside an attention module or
  between them, with the lengths of its pieces: how text and image tokens were joined;
- each hand-written softmax, to name the modules asag cannot use.

A second pass on a changed image input (the model's sample) gives, per query row of every SDPA
call, whether that row depends on the image at all: text-only layers and the text rows of a
freshly joined sequence do not. :mod:`asag.patching.layout` classifies layers from these
records.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .registry import lookup

SAMPLE_NAMES = ("sample", "hidden_states", "x", "latents", "latent_model_input")
TEXT_NAMES = ("encoder_hidden_states", "context", "cond", "text_embeds")
_CATS = {torch.cat, torch.concat, torch.concatenate}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


def token_count(t) -> Optional[int]:
    """Tokens in a (B, N, C) sequence or a (B, C, H, W) feature map."""
    if not isinstance(t, torch.Tensor):
        return None
    if t.dim() == 3:
        return t.shape[1]
    if t.dim() == 4:
        return t.shape[2] * t.shape[3]
    return None


def module_inputs(args, kwargs) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(hidden_states, encoder_hidden_states) of a module call, by name or position."""
    hidden = next((kwargs[n] for n in ("hidden_states", "x") if isinstance(kwargs.get(n), torch.Tensor)), None)
    positional = [a for a in args if isinstance(a, torch.Tensor)]
    if hidden is None and positional:
        hidden = positional.pop(0)
    text = kwargs.get("encoder_hidden_states")
    if not isinstance(text, torch.Tensor):
        text = positional[0] if positional and positional[0].dim() == 3 and hidden is not None and hidden.dim() == 3 else None
    return hidden, text


def model_sample(args, kwargs) -> Optional[Tuple[str, int]]:
    """Where a model call's image input (its sample / latents) is: (kwarg name, -1) or ("", index)."""
    for name in SAMPLE_NAMES:
        if isinstance(kwargs.get(name), torch.Tensor):
            return name, -1
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return "", i
    return None


def get_sample(args, kwargs, where) -> torch.Tensor:
    name, index = where
    return kwargs[name] if name else args[index]


def with_sample(args, kwargs, where, value):
    name, index = where
    if name:
        return args, dict(kwargs, **{name: value})
    args = list(args)
    args[index] = value
    return tuple(args), kwargs


@dataclass
class SdpaCall:
    q_shape: tuple
    k_shape: tuple
    rows: Optional[torch.Tensor] = field(default=None, repr=False)  # (B, Nq, 2) fingerprints


@dataclass
class Cat:
    """One token-dimension concatenation: the lengths of its pieces along that dimension."""

    order: int  # when it happened in the pass (event counter)
    lengths: Tuple[int, ...]
    ndim: int
    dim: int
    batch: int


@dataclass
class ModuleCall:
    """The first call of one module in a probe pass."""

    name: str
    module: torch.nn.Module = field(repr=False)
    order: int
    hidden_tokens: Optional[int]
    text_tokens: Optional[int]
    batch: Optional[int]
    q_object: Optional[int] = None  # id() of the first tensor input, to skip modules given q itself
    sdpa: List[SdpaCall] = field(default_factory=list)
    cats: List[Cat] = field(default_factory=list)
    softmax: bool = False


@dataclass
class ProbePass:
    calls: Dict[str, ModuleCall]
    cats: List[Cat]  # every token-dimension cat of 3-D sequences, in order
    sample_shape: Optional[tuple]

    def attention_calls(self) -> List[ModuleCall]:
        return sorted((c for c in self.calls.values() if c.sdpa), key=lambda c: c.order)


def _fingerprint(q: torch.Tensor) -> torch.Tensor:
    """(B, Nq, 2): two fixed random projections of each query row (over heads and channels).
    Sums would not do: normalised queries (qk-norm) have constant sums of squares."""
    x = q.detach().double()
    if x.dim() == 4:
        x = x.transpose(1, 2).flatten(2)  # (B, Nq, H * D)
    g = torch.Generator().manual_seed(x.shape[-1])
    w = torch.randn(x.shape[-1], 2, generator=g, dtype=torch.float64).to(x.device)
    return x @ w


class _Recorder(TorchFunctionMode):
    def __init__(self, probe: "_Pass"):
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        p = self.probe
        if func is F.scaled_dot_product_attention:
            p.on_sdpa(args, kwargs)
        elif func in _CATS:
            p.on_cat(args, kwargs, out)
        elif func in _SOFTMAX and p.stack:
            p.stack[-1].softmax = True
        return out


class _Pass:
    """The state of one probe pass."""

    def __init__(self, names: Dict[torch.nn.Module, str]):
        self.names = names
        self.stack: List[ModuleCall] = []
        self.calls: Dict[str, ModuleCall] = {}
        self.cats: List[Cat] = []
        self.order = 0

    def pre(self, module, args, kwargs):
        hidden, text = module_inputs(args, kwargs)
        name = self.names[module]
        call = ModuleCall(
            name, module, self.order, token_count(hidden), token_count(text),
            hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 else None,
            id(hidden) if hidden is not None else None,
        )
        self.order += 1
        self.stack.append(call)

    def post(self, module, *_):
        if not self.stack:
            return
        call = self.stack.pop()
        kept = self.calls.get(call.name)
        if kept is None or (not kept.sdpa and call.sdpa):  # the first call that reached SDPA
            self.calls[call.name] = call

    def owner(self, q) -> Optional[ModuleCall]:
        live = self.stack
        for call in reversed(live):  # the innermost registered attention class first
            if lookup(call.module) is not None:
                return call
        for call in reversed(live):  # else the innermost module that was not handed q itself
            if call.q_object != id(q):
                return call
        return None

    def on_sdpa(self, args, kwargs):
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        owner = self.owner(q)
        if owner is None or not isinstance(q, torch.Tensor):
            return
        owner.sdpa.append(SdpaCall(tuple(q.shape), tuple(k.shape), _fingerprint(q)))
        self.order += 1

    def on_cat(self, args, kwargs, out):
        tensors = kwargs.get("tensors", args[0] if args else None)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if not isinstance(out, torch.Tensor) or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
            return
        dim = dim % out.dim() if out.dim() else 0
        # token dimensions: (B, N, C) and (B, N, H, D) along 1, (B, H, N, D) along 2
        if not ((out.dim() in (3, 4) and dim == 1) or (out.dim() == 4 and dim == 2)):
            return
        cat = Cat(self.order, tuple(t.shape[dim] for t in tensors), out.dim(), dim, out.shape[0])
        self.order += 1
        if out.dim() == 3:
            self.cats.append(cat)
        for call in self.stack:  # a cat inside an attention module's child belongs to it too
            call.cats.append(cat)


@contextlib.contextmanager
def _eager():
    """Compiled models are probed eagerly: the probe's hooks and mode must see every call."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None:
        yield
    else:
        with stance("force_eager"):
            yield


@contextlib.contextmanager
def sdpa_flags_on(modules):
    """Turns registered SDPA switches (timm's fused_attn) on; restores them on any exit."""
    saved = []
    try:
        for m in modules:
            entry = lookup(m)
            if entry is not None and entry.sdpa_flag and hasattr(m, entry.sdpa_flag):
                saved.append((m, entry.sdpa_flag, getattr(m, entry.sdpa_flag)))
                setattr(m, entry.sdpa_flag, True)
        yield
    finally:
        for m, flag, value in reversed(saved):
            setattr(m, flag, value)


def run_pass(model: torch.nn.Module, args, kwargs) -> ProbePass:
    """One forward pass of ``model`` with every module hooked and SDPA/cat/softmax recorded."""
    names = {m: n for n, m in model.named_modules()}
    state = _Pass(names)
    hooks = []
    try:
        for module in names:
            hooks.append(module.register_forward_pre_hook(state.pre, with_kwargs=True, prepend=True))
            hooks.append(module.register_forward_hook(state.post, always_call=True))
        with torch.no_grad(), _eager(), sdpa_flags_on(list(names)), _Recorder(state):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    where = model_sample(args, kwargs)
    sample = get_sample(args, kwargs, where) if where else None
    return ProbePass(state.calls, state.cats, tuple(sample.shape) if isinstance(sample, torch.Tensor) else None)


def image_dependence(model: torch.nn.Module, args, kwargs, base: ProbePass) -> Dict[str, List[Optional[torch.Tensor]]]:
    """Per module and SDPA call: a bool (Nq,) tensor, True where that query row changed when
    the model's image input changed (None where shapes differ). Empty if the model has no
    floating-point image input."""
    where = model_sample(args, kwargs)
    if where is None:
        return {}
    sample = get_sample(args, kwargs, where)
    if not sample.is_floating_point():
        return {}
    g = torch.Generator(device=sample.device).manual_seed(1234)
    noise = torch.randn(sample.shape, generator=g, device=sample.device, dtype=torch.float32)
    changed = (sample.float() + noise * (sample.float().std().nan_to_num(0.0) + 1.0)).to(sample.dtype)
    args2, kwargs2 = with_sample(args, kwargs, where, changed)
    other = run_pass(model, args2, kwargs2)
    result = {}
    for name, call in base.calls.items():
        peer = other.calls.get(name)
        if not call.sdpa or peer is None:
            continue
        rows = []
        for a, b in zip(call.sdpa, peer.sdpa):
            if a.rows is None or b.rows is None or a.rows.shape != b.rows.shape:
                rows.append(None)
                continue
            diff = (a.rows - b.rows).abs() > 1e-5 * (a.rows.abs() + 1.0)
            rows.append(diff.any(dim=-1).any(dim=0))
        result[name] = rows
    return result
