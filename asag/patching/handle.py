"""The handle of a model patched by :func:`asag.apply`: its layers, guidance state and removal.

Mechanism: each selected attention module's ``forward`` is wrapped (an instance attribute,
removed again by ``remove()``); the wrapper enters a ``TorchFunctionMode`` only while that
module runs, and only on a thread inside a guidance block. The mode sees the module's calls of ``torch.nn.functional.scaled_dot_product_attention``
with q, k, v as the processor built them (fused-qkv splits, qk-norm, rotary embeddings and
joint concatenation included), runs SDPA on the clean rows and asag's Sinkhorn attention on the
perturbed ones. Processors, state dicts, parameters and other hooks stay as they are, and
removal leaves no trace. A forward hook on the model itself probes it and checks that each
guided forward pass reached an attention layer.

State: guidance belongs to the thread that opened it (a forward in another thread is never
perturbed). Hooks are small objects that hold their handle, so ``copy.deepcopy`` of a patched
model gives a copy patched by its own handle (``asag.apply(copy)`` returns it). An interrupt
(any ``BaseException``) mid-forward leaves no mode on the thread's stack and no attribute
changed once the guidance block or the pipeline call it interrupted is left.
"""

import contextlib
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import discovery, probe
from .discovery import LayerInfo
from .perturb import Perturbation, bind_sdpa, perturbed_sdpa, row_ranges
from .registry import lookup
from .selection import Selection, select_layers

_local = threading.local()
_disable = getattr(torch.compiler, "disable", None) or torch._dynamo.disable


@dataclass
class _Entry:
    """One selected layer's call in flight on this thread."""

    name: str
    mode: Optional["_SDPAInterceptor"]
    stack_depth: int
    batch: int
    hidden_tokens: Optional[int]
    flag: Optional[tuple] = None  # (module, attribute, previous value) to restore
    offset: int = 0  # rows of the module batch covered by earlier per-sample SDPA calls


@dataclass
class _ThreadState:
    """Guidance state of one handle on one thread."""

    perturbation: Optional[Perturbation] = None
    key: object = None  # whose layer selection (a user of the handle), None: handle.selected
    call_scoped: bool = False  # set by a pipeline for one denoiser call
    nested: bool = False  # a forward the pipeline itself makes inside its call
    probing: bool = False
    hits: int = 0  # SDPA calls perturbed
    forwards: List[int] = field(default_factory=list)  # hits at each model forward's start
    entries: List[_Entry] = field(default_factory=list)


def thread_state(handle: "ASAGHandle") -> _ThreadState:
    states = getattr(_local, "states", None)
    if states is None:
        states = _local.states = weakref.WeakKeyDictionary()
    state = states.get(handle)
    if state is None:
        state = states[handle] = _ThreadState()
    return state


class _SDPAInterceptor(TorchFunctionMode):
    """Routes the SDPA calls made while one attention module runs to its handle."""

    def __init__(self, handle: "ASAGHandle", entry: _Entry):
        super().__init__()
        self.handle, self.entry = handle, entry

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.route(args, kwargs)
        return func(*args, **kwargs)

    @_disable  # decided eagerly: under torch.compile, thread state must not become guards
    def route(self, args, kwargs):
        live = not self.handle.removed and any(e is self.entry for e in thread_state(self.handle).entries)
        if live:  # not a mode left over by an interrupted forward
            return self.handle._on_sdpa(self.entry, args, kwargs)
        return F.scaled_dot_product_attention(*args, **kwargs)


class _Inert:
    """Stands in for a removed handle in a patch asag could not take off."""

    removed = True

    def _enter_layer(self, *args):
        return None


def _pop_modes(depth: int) -> None:
    """Pops the thread's torch-function modes down to ``depth`` entries."""
    while torch._C._len_torch_function_stack() > depth:
        torch._C._pop_torch_function_stack()


# Hooks are objects holding their handle (not closures), so that a deep copy of the model gets
# hooks bound to a deep copy of the handle.


class _PatchedForward:
    """A selected layer's ``forward`` while asag is applied: the module's own forward, run
    eagerly (a graph break under torch.compile, inside this layer only), with asag's SDPA
    interception around it when this thread's guidance selects the layer. An instance
    attribute rather than a hook, so that torch.compile guards on it: compiled code of the
    same class is never reused for a patched and an unpatched instance."""

    def __init__(self, handle, name, module, previous):
        self.handle, self.name, self.module, self.previous = handle, name, module, previous

    def original(self):
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    @_disable
    def __call__(self, *args, **kwargs):
        entry = self.handle._enter_layer(self.name, self.module, args, kwargs)
        try:
            return self.original()(*args, **kwargs)
        finally:
            if entry is not None:
                self.handle._exit_layer(entry)


class _ModelPre:
    def __init__(self, handle):
        self.handle = handle

    @_disable
    def __call__(self, module, args, kwargs):
        self.handle._enter_model(args, kwargs)


class _ModelPost:
    def __init__(self, handle):
        self.handle = handle

    @_disable
    def __call__(self, module, args, kwargs, output):
        self.handle._exit_model(raised=output is None)  # torch passes None when forward raised


def _signature(args, kwargs) -> tuple:
    """Shapes of a call's tensors without their batch size: a new one means new token counts."""
    def shapes(obj):
        if isinstance(obj, torch.Tensor):
            return (tuple(obj.shape[1:]),)
        if isinstance(obj, (list, tuple)):
            return tuple(s for o in obj for s in shapes(o))
        if isinstance(obj, dict):
            return tuple((k, shapes(v)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])))
        return ()

    return shapes(args) + shapes(kwargs)


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
        self._users: Dict[object, Selection] = {}  # other selections (pipelines sharing the model)
        self._user_layers: Dict[object, List[str]] = {}
        self._hooks: list = []
        self._patched: Dict[str, _PatchedForward] = {}
        self._signature: Optional[tuple] = None

    # ---- set-up and removal -------------------------------------------------------------

    def _install(self) -> None:
        self._hooks = [
            self.model.register_forward_pre_hook(_ModelPre(self), with_kwargs=True, prepend=True),
            self.model.register_forward_hook(_ModelPost(self), with_kwargs=True, always_call=True),
        ]

    def _layer(self, name: str) -> Optional[LayerInfo]:
        return next((l for l in self.layers if l.name == name), None)

    def _hooked_names(self) -> List[str]:
        names = [l.name for l in self.selected]
        for user in self._user_layers.values():
            names += [n for n in user if n not in names]
        return names

    def _rehook(self) -> None:
        """Patches exactly the layers some selection needs."""
        wanted = self._hooked_names() if self._hooks else []
        for name in [n for n in self._patched if n not in wanted]:
            self._unpatch(self._patched.pop(name))
        for name in wanted:
            if name not in self._patched:
                module = self._layer(name).module
                patch = _PatchedForward(self, name, module, module.__dict__.get("forward"))
                module.forward = patch
                self._patched[name] = patch

    @staticmethod
    def _unpatch(patch: _PatchedForward) -> None:
        module = patch.module
        if module.__dict__.get("forward") is patch:
            if patch.previous is None:
                del module.forward
            else:
                module.forward = patch.previous
        else:  # something wrapped our forward since: leave it in place, inert
            patch.handle = _Inert()

    def _check_live(self) -> None:
        if self.removed:
            raise RuntimeError("this asag handle was removed; call asag.apply(model) again")

    def select(self, selection: Selection) -> "ASAGHandle":
        """Chooses the perturbed layers (see asag.patching.selection); re-hooks them."""
        self._check_live()
        chosen = select_layers(self.layers, selection, require_kind=self.resolved)
        self.selection = selection
        if self.resolved:
            self.selected = chosen
            self._rehook()
        return self

    def _add_user(self, key, selection: Selection) -> None:
        """Registers another selection on this model (a pipeline's), under a hashable key."""
        self._check_live()
        # Without any known layer yet (no registered class), the probe validates it later.
        known = self.resolved or self.layers
        names = [l.name for l in select_layers(self.layers, selection, require_kind=self.resolved)] if known else []
        self._users[key] = selection
        self._user_layers[key] = names if self.resolved else []
        self._rehook()

    def _remove_user(self, key) -> None:
        self._users.pop(key, None)
        self._user_layers.pop(key, None)
        if self._hooks:
            self._rehook()

    def user_layers(self, key) -> frozenset:
        """Names of the layers a selection perturbs (key None: the handle's own)."""
        if key is None:
            return frozenset(l.name for l in self.selected)
        return frozenset(self._user_layers.get(key, ()))

    def attach(self) -> None:
        """(Re)installs every hook, keeping what the probe found."""
        self._check_live()
        if not self._hooks:
            self._install()
            self._rehook()

    def detach(self) -> None:
        """Removes every hook but keeps the probe's results, for a later :meth:`attach`."""
        self._cleanup_thread()
        for patch in self._patched.values():
            self._unpatch(patch)
        for h in self._hooks:
            h.remove()
        self._patched, self._hooks = {}, []

    def remove(self) -> None:
        """Removes every hook asag added; the model is as it was before asag.apply."""
        self.detach()
        self._users.clear()
        self._user_layers.clear()
        self.removed = True

    def __enter__(self) -> "ASAGHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __deepcopy__(self, memo):
        copy = ASAGHandle.__new__(ASAGHandle)
        memo[id(self)] = copy
        for key, value in vars(self).items():
            setattr(copy, key, _deepcopy(value, memo))
        return copy

    # ---- probing -------------------------------------------------------------------------

    def probe(self, *args, **kwargs) -> "ASAGHandle":
        """Runs the probe passes on these inputs (no gradients, no guidance: one forward pass,
        and one more with a changed image input) to find and classify every attention layer,
        then resolves the layer selection."""
        self._check_live()
        state = thread_state(self)
        state.probing = True
        try:
            base = probe.run_pass(self.model, args, kwargs)
            if not base.attention_calls():
                raise ValueError(self._no_attention_message(base))
            dependence = probe.image_dependence(self.model, args, kwargs, base)
        finally:
            state.probing = False
        layers = discovery.classify(self.model, base, dependence)
        self.layers, self.resolved = layers, True
        self._signature = _signature(args, kwargs)
        for key, spec in self._users.items():
            self._user_layers[key] = [l.name for l in select_layers(self.layers, spec, require_kind=True)]
        self.select(self.selection)
        self._warn_unsupported()
        return self

    def _warn_unsupported(self) -> None:
        """Names, once per set of layers, the attention layers asag found but cannot perturb."""
        bad = [l for l in self.layers if l.kind == "unsupported"]
        key = tuple(l.name for l in bad)
        if not bad or getattr(self, "_warned", None) == key:
            return
        self._warned = key
        listing = "; ".join(f"{l.name} ({l.reason})" for l in bad[:12]) + (" ..." if len(bad) > 12 else "")
        warnings.warn(
            f"asag cannot perturb {len(bad)} attention layer(s) of {type(self.model).__name__}; they are "
            f"left as they are: {listing}",
            UserWarning,
            stacklevel=4,
        )

    def _no_attention_message(self, base) -> str:
        manual = discovery.softmax_modules(base)
        known = [f"{l.name} [{l.processor}]" for l in self.layers]
        text = (
            f"asag.apply found no attention layer it can use in {type(self.model).__name__}: its modules "
            "never called torch.nn.functional.scaled_dot_product_attention"
        )
        if known:
            text += f" (not even its {len(known)} attention modules, e.g. {known[0]})"
        if manual:
            text += (
                f". These modules compute a softmax by hand: {', '.join(manual[:8])}"
                f"{' ...' if len(manual) > 8 else ''}. asag needs SDPA: register their class with "
                "asag.register_attention(cls, sdpa_flag=...) if it has a switch to an SDPA path, or make "
                "its forward call torch.nn.functional.scaled_dot_product_attention"
            )
        return text

    def ensure_probed(self, *args, **kwargs) -> None:
        """Probes with these inputs unless the layers are classified for inputs of this shape."""
        if thread_state(self).probing:
            return
        if not self.resolved:
            self.probe(*args, **kwargs)
        elif self._signature != _signature(args, kwargs) and any(l.single_stream for l in self.layers if l.name in self._hooked_names()):
            self.probe(*args, **kwargs)  # new token counts: the joint sequences' layout changed

    def selected_for(self, key) -> List[LayerInfo]:
        names = self.user_layers(key)
        return [l for l in self.layers if l.name in names]

    # ---- per-call hooks ------------------------------------------------------------------

    def _enter_model(self, args, kwargs) -> None:
        state = thread_state(self)
        if state.probing:
            return
        if state.call_scoped and not state.nested:
            self._cleanup_thread()  # a pipeline call on this thread was interrupted: forget it
        if state.perturbation is not None:
            self.ensure_probed(*args, **kwargs)
            state.forwards.append(state.hits)

    def _exit_model(self, raised: bool = False) -> None:
        state = thread_state(self)
        if state.probing or state.perturbation is None or not state.forwards:
            return
        start = state.forwards.pop()
        if state.hits == start and not raised:
            raise RuntimeError(self._no_op_message(state.key))

    def _no_op_message(self, key) -> str:
        layers = self.selected_for(key)
        now = [f"{l.name}: processor {discovery.processor_name(l.module)} (probed: {l.processor})"
               + (f", attention backend {b}" if (b := getattr(getattr(l.module, "processor", None), "_attention_backend", None)) else "")
               for l in layers]
        return (
            "asag guidance reached no attention layer in this forward pass, so the perturbed branch "
            "equals the plain one. The selected layers made no scaled_dot_product_attention call asag "
            "could perturb: attention slicing, xformers, a non-native attention backend or a processor "
            "swapped after asag probed the model bypass SDPA. Switch back to the default SDPA processor "
            "(pipe.disable_attention_slicing(), model.set_default_attn_processor() or "
            "model.reset_attention_backend()). Selected layers now: " + "; ".join(now)
        )

    def _enter_layer(self, name: str, module, args, kwargs) -> Optional[_Entry]:
        """Starts intercepting SDPA in this layer if this thread's guidance selects it."""
        state = thread_state(self)
        if self.removed or state.probing or state.perturbation is None or name not in self.user_layers(state.key):
            return None
        hidden, _ = probe.module_inputs(args, kwargs)
        batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 else None
        entry = _Entry(name, None, torch._C._len_torch_function_stack(), batch, probe.token_count(hidden))
        state.entries.append(entry)
        registered = lookup(module)
        if registered is not None and registered.sdpa_flag and hasattr(module, registered.sdpa_flag):
            entry.flag = (module, registered.sdpa_flag, getattr(module, registered.sdpa_flag))
            setattr(module, registered.sdpa_flag, True)
        entry.mode = _SDPAInterceptor(self, entry)
        entry.mode.__enter__()
        return entry

    def _exit_layer(self, entry: _Entry) -> None:
        state = thread_state(self)
        if entry in state.entries:
            state.entries.remove(entry)
            self._close(entry)

    @staticmethod
    def _close(entry: _Entry) -> None:
        _pop_modes(entry.stack_depth)
        if entry.flag is not None:
            module, attribute, value = entry.flag
            setattr(module, attribute, value)

    def _cleanup_thread(self) -> None:
        """Undoes whatever an interrupted forward left on this thread: modes, flags, state."""
        state = thread_state(self)
        while state.entries:
            self._close(state.entries.pop())
        if state.call_scoped:
            state.perturbation, state.key, state.call_scoped, state.nested = None, None, False, False
        state.forwards.clear()

    def _on_sdpa(self, entry: _Entry, args, kwargs):
        state = thread_state(self)
        p = state.perturbation
        sdpa = bind_sdpa(args, kwargs)
        q, k = sdpa["query"], sdpa["key"]
        layer = self._layer(entry.name)
        if p is None or layer is None or not layer.perturbable:
            return F.scaled_dot_product_attention(*args, **kwargs)
        nq, nk = q.shape[-2], k.shape[-2]
        joint = None
        if layer.kind == "joint" and not layer.text_queries:  # added text keys and values
            if nk <= nq:
                return F.scaled_dot_product_attention(*args, **kwargs)
            joint = (nk - nq, layer.text_first, False)
        elif nq != nk:
            return F.scaled_dot_product_attention(*args, **kwargs)
        elif layer.kind == "joint":
            n = layer.image_tokens if layer.single_stream else entry.hidden_tokens
            if n is None or not 0 < n <= nq:
                return F.scaled_dot_product_attention(*args, **kwargs)
            joint = (nq - n, layer.text_first)
        module_batch = entry.batch if entry.batch else q.shape[0]
        ranges = row_ranges(p, module_batch, q.shape[0], entry.offset)
        if q.shape[0] < module_batch:
            entry.offset += q.shape[0]
        if not ranges:
            return F.scaled_dot_product_attention(*args, **kwargs)
        state.hits += 1
        return perturbed_sdpa(sdpa, p, ranges, joint)

    # ---- guidance ------------------------------------------------------------------------

    @contextlib.contextmanager
    def guidance(self, *, chunks: int, perturbed, lam: float, iters: int, tau: float = 1.0,
                 variant: str = "sinkhorn", seed: int = 0, layers: Selection = None):
        """Within this block, on this thread, batch chunks listed in ``perturbed`` (an index
        or a list, of ``chunks`` equal ones) use Sinkhorn attention in the selected layers
        (or in ``layers``, a selection for this block only); every other chunk is computed
        exactly as without asag. Without an active guidance block the model is untouched.
        ``variant`` picks another perturbation for comparisons (see Perturbation). A forward
        pass in the block that perturbs no attention call raises (never a silent no-op)."""
        with self.perturbing(Perturbation(chunks, perturbed, lam, iters, tau, variant, seed), layers):
            yield self

    @contextlib.contextmanager
    def perturbing(self, perturbation: Perturbation, layers: Selection = None):
        """:meth:`guidance` with a ready :class:`Perturbation` (what asag's samplers use)."""
        self._check_live()
        key = None
        if layers is not None:
            key = ("block", id(perturbation), threading.get_ident())
            self._add_user(key, layers)
        state = thread_state(self)
        previous = (state.perturbation, state.key)
        state.perturbation, state.key = perturbation, key
        try:
            yield self
        finally:
            self._cleanup_thread()
            state.perturbation, state.key = previous
            if key is not None:
                self._remove_user(key)

    def _begin_call(self, perturbation: Perturbation, key, nested: bool = False) -> int:
        """Guidance for one denoiser call made by a pipeline (asag.enable), on this thread,
        until :meth:`_end_call`; an interrupted call is forgotten at the next forward. Returns
        the count of perturbed SDPA calls so far, for :meth:`_check_reached`."""
        state = thread_state(self)
        state.perturbation, state.key, state.call_scoped, state.nested = perturbation, key, True, nested
        return state.hits

    def _end_call(self) -> None:
        state = thread_state(self)
        while state.entries:
            self._close(state.entries.pop())
        state.perturbation, state.key, state.call_scoped, state.nested = None, None, False, False

    def _check_reached(self, start: int, key) -> None:
        """Raises unless an SDPA call was perturbed since ``start`` (never a silent no-op)."""
        if thread_state(self).hits == start:
            raise RuntimeError(self._no_op_message(key))

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("probed" if self.resolved else "not probed yet")
        lines = [f"ASAGHandle({type(self.model).__name__}, {state}, {len(self.selected)} selected layers)"]
        chosen = {l.name for l in self.selected}
        lines += [("* " if l.name in chosen else "  ") + l.describe() for l in self.layers]
        return "\n".join(lines)


def _deepcopy(value, memo):
    import copy

    return copy.deepcopy(value, memo)


def existing_handle(model: torch.nn.Module) -> Optional[ASAGHandle]:
    """The live handle attached to ``model``, found through its hooks (so copies have theirs)."""
    for hook in list(model._forward_pre_hooks.values()):
        if isinstance(hook, _ModelPre) and not hook.handle.removed and hook.handle.model is model:
            return hook.handle
    return None
