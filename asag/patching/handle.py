"""The handle of a model patched by :func:`asag.apply`: its layers, guidance state and removal.

Mechanism: torch-native forward pre/post hooks on each selected attention module enter a
``TorchFunctionMode`` only while that module runs and only while a guidance context is
active. The mode sees the module's calls of ``torch.nn.functional.scaled_dot_product_attention``
with q, k, v as the processor built them (fused-qkv splits, qk-norm, rotary embeddings and
joint concatenation included), lets the original call compute the whole batch, and replaces
the perturbed chunks' rows. Nothing about the module is swapped or overridden: processors,
state dicts, attributes and other hooks stay as they are, and removal leaves no trace.
"""

import contextlib
import weakref
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .discovery import CallRecord, LayerInfo, classify, is_timm_attention, token_count, value_order
from .perturb import Perturbation, bind_sdpa, perturbed_sdpa
from .selection import Selection, select_layers

_HANDLES: "weakref.WeakKeyDictionary[torch.nn.Module, ASAGHandle]" = weakref.WeakKeyDictionary()


class _SDPAInterceptor(TorchFunctionMode):
    """Routes the SDPA calls made while one attention module runs to its handle."""

    def __init__(self, handle: "ASAGHandle", layer: LayerInfo):
        super().__init__()
        self.handle, self.layer = handle, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            out = self.handle._on_sdpa(self.layer, out, args, kwargs)
        return out


def _module_inputs(module, args, kwargs):
    """(hidden_states, encoder_hidden_states) of an attention module's call."""
    hidden = kwargs.get("hidden_states", kwargs.get("x", args[0] if args else None))
    text = kwargs.get("encoder_hidden_states")
    if text is None and len(args) > 1 and isinstance(args[1], torch.Tensor) and not is_timm_attention(module):
        text = args[1]
    return hidden, text


class ASAGHandle:
    """What :func:`asag.apply` returns. ``layers`` lists every attention layer found (with
    kind and shape once probed), ``selected`` those ASAG perturbs; ``guidance(...)`` turns the
    perturbation on for a block of code; ``remove()`` (or leaving a ``with`` block) restores
    the model exactly."""

    def __init__(self, model: torch.nn.Module, layers: List[LayerInfo], selection: Selection):
        self.model = model
        self.layers = layers
        self.selection = selection
        self.selected: List[LayerInfo] = []
        self.resolved = False
        self.removed = False
        self._perturbation: Optional[Perturbation] = None
        self._hooks: list = []
        self._layer_hooks: list = []
        self._probing = False
        self._records: Dict[int, CallRecord] = {}
        self._calls: Dict[int, List[CallRecord]] = {}
        self._modes: Dict[int, List[_SDPAInterceptor]] = {}
        self._timm_fused: Dict[int, List[bool]] = {}
        self._model_text_tokens: Optional[int] = None
        self._model_tokens: Optional[int] = None

    # ---- set-up and removal -------------------------------------------------------------

    def _install(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        _HANDLES[self.model] = self

    def _hook_layers(self, layers: List[LayerInfo]) -> list:
        hooks = []
        try:
            for layer in layers:
                hooks.append(layer.module.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
                hooks.append(
                    layer.module.register_forward_hook(self._post_hook(layer), with_kwargs=True, always_call=True)
                )
        except Exception:
            for h in hooks:
                h.remove()
            raise
        return hooks

    def select(self, selection: Selection) -> "ASAGHandle":
        """Chooses the perturbed layers (see asag.patching.selection); re-hooks them."""
        chosen = select_layers(self.layers, selection, require_kind=self.resolved)
        self.selection = selection
        if self.resolved:
            hooks = self._hook_layers(chosen)
            for h in self._layer_hooks:
                h.remove()
            self._layer_hooks, self.selected = hooks, chosen
        return self

    def remove(self) -> None:
        """Removes every hook asag added; the model is as it was before asag.apply."""
        for h in self._layer_hooks + self._hooks:
            h.remove()
        self._layer_hooks, self._hooks = [], []
        self._perturbation = None
        self.removed = True
        if _HANDLES.get(self.model) is self:
            del _HANDLES[self.model]

    def __enter__(self) -> "ASAGHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- probing -------------------------------------------------------------------------

    def probe(self, *args, **kwargs) -> "ASAGHandle":
        """Runs one forward pass of the model on these inputs (no gradients, no guidance) to
        classify every attention layer, then resolves the layer selection."""
        if self.removed:
            raise RuntimeError("this asag handle was removed; call asag.apply(model) again")
        temporary = self._hook_layers(self.layers)
        self._probing, self._records = True, {}
        previous, self._perturbation = self._perturbation, None
        try:
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            self._probing, self._perturbation = False, previous
            for h in temporary:
                h.remove()
        for layer in self.layers:
            classify(layer, self._records.get(layer.index))
        self.resolved = True
        self.select(self.selection)
        return self

    def ensure_probed(self, *args, **kwargs) -> None:
        """Probes with these inputs unless the layers are classified already."""
        if not self.resolved and not self._probing:
            self.probe(*args, **kwargs)

    def _model_pre_hook(self, model, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        self._model_tokens = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None
        self._model_text_tokens = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() == 3 else None
        if self._perturbation is not None:
            self.ensure_probed(*args, **kwargs)  # first guided call: classify the layers first

    # ---- per-call hooks ------------------------------------------------------------------

    def _pre_hook(self, layer: LayerInfo):
        def hook(module, args, kwargs):
            if not self._probing and self._perturbation is None:
                return
            hidden, text = _module_inputs(module, args, kwargs)
            record = CallRecord(token_count(hidden), token_count(text), self._model_text_tokens, self._model_tokens)
            record.hidden_states = hidden
            self._calls.setdefault(layer.index, []).append(record)
            if is_timm_attention(module):  # timm takes the SDPA path only when fused_attn is set
                self._timm_fused.setdefault(layer.index, []).append(module.fused_attn)
                module.fused_attn = True
            mode = _SDPAInterceptor(self, layer)
            self._modes.setdefault(layer.index, []).append(mode)
            mode.__enter__()

        return hook

    def _post_hook(self, layer: LayerInfo):
        def hook(module, args, kwargs, output):
            modes = self._modes.get(layer.index)
            if not modes:
                return
            modes.pop().__exit__(None, None, None)
            record = self._calls[layer.index].pop()
            record.hidden_states = None
            if self._probing and layer.index not in self._records:
                self._records[layer.index] = record
            if is_timm_attention(module):
                module.fused_attn = self._timm_fused[layer.index].pop()

        return hook

    def _on_sdpa(self, layer: LayerInfo, out, args, kwargs):
        record = self._calls[layer.index][-1]
        sdpa = bind_sdpa(args, kwargs)
        q, k = sdpa["query"], sdpa["key"]
        if self._probing:
            if not record.sdpa:
                record.sdpa.append((tuple(q.shape), tuple(k.shape)))
                h, e = record.hidden_tokens, record.text_tokens
                if e is not None and h is not None and q.shape[-2] == h + e and record.hidden_states is not None:
                    record.value_check = value_order(layer.module, record.hidden_states, sdpa["value"])
            return out
        p = self._perturbation
        if p is None or q.shape[-2] != k.shape[-2]:
            return out
        joint = None
        if layer.kind == "joint":
            text = self._model_text_tokens if layer.single_stream else record.text_tokens
            expected = record.hidden_tokens if layer.single_stream else (record.hidden_tokens or 0) + (text or 0)
            if text is None or q.shape[-2] != expected:
                return out
            joint = (text, layer.text_first)
        elif record.hidden_tokens is not None and q.shape[-2] != record.hidden_tokens:
            return out  # not this layer's self-attention call
        return perturbed_sdpa(out, sdpa, p, joint)

    # ---- guidance ------------------------------------------------------------------------

    @contextlib.contextmanager
    def guidance(self, *, chunks: int, perturbed, lam: float, iters: int, tau: float = 1.0,
                 variant: str = "sinkhorn", seed: int = 0):
        """Within this block, batch chunks listed in ``perturbed`` (of ``chunks`` equal ones)
        use Sinkhorn attention in the selected layers; every other chunk is computed exactly
        as without asag. Without an active guidance block the model is untouched.
        ``variant`` picks another perturbation for comparisons (see Perturbation)."""
        perturbation = Perturbation(chunks, tuple(perturbed), lam, iters, tau, variant, seed)
        if self.removed:
            raise RuntimeError("this asag handle was removed; call asag.apply(model) again")
        previous, self._perturbation = self._perturbation, perturbation
        try:
            yield self
        finally:
            self._perturbation = previous

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("probed" if self.resolved else "not probed yet")
        lines = [f"ASAGHandle({type(self.model).__name__}, {state}, {len(self.selected)} selected layers)"]
        chosen = {l.index for l in self.selected}
        lines += [("* " if l.index in chosen else "  ") + l.describe() for l in self.layers]
        return "\n".join(lines)


def existing_handle(model: torch.nn.Module) -> Optional[ASAGHandle]:
    return _HANDLES.get(model)
