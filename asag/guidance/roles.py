"""What a denoiser call is for, read from the pipeline that made it.

asag does not guess a pipeline's classifier-free-guidance layout from an even batch. At each
denoiser call it finds the enabled pipeline's frames on the call stack and reads the pipeline's
own variables:

- **Row roles.** Each row of the call's conditioning arguments (text embeddings, class labels,
  pooled or image embeddings) is compared with the pipeline's variables: a row equal to a row
  of a variable named as unconditional (``negative_*``, ``*uncond*``, ``*null*``, ...) is
  unconditional, a row equal only to rows of other conditioning variables (``prompt_embeds``,
  ``class_labels``, ...) is conditional. This covers batched CFG ``[u, c]`` whatever its order,
  CFG made as separate calls, several prompts, several images per prompt, embeddings repeated
  per video frame, and calls without CFG. A row that matches nothing, or both, raises
  :class:`UnknownRole`.
- **The CFG scale** the pipeline will apply to the conditional prediction, by the first rule of
  :data:`SCALE_RULES` that finds its variable, and **whether CFG runs** at a step whose
  unconditional prediction comes from another call, by :data:`CFG_RULES`.
"""

import math
import numbers
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

NEGATIVE = re.compile(r"(^|_)(negative|neg|uncond|unconditional|null|empty)(_|$)")
CONDITIONING = re.compile(r"prompt|embed|text|cond|class|caption|context|label")
# Arguments that are never a per-row condition (even when their values happen to match).
NOT_CONDITIONING = re.compile(r"time|^t$|sigma|guidance|_ids$|ids$|mask|rotary|rope|freqs|scale|coords|size")


class UnknownRole(RuntimeError):
    """asag cannot tell which rows of a denoiser call are conditional: it refuses to guess."""


def _message(detail: str) -> str:
    return (
        f"asag cannot tell the unconditional and conditional rows of this denoiser call apart: {detail}. "
        "asag never guesses a pipeline's guidance layout; for this pipeline, call the denoiser yourself "
        "with asag.guided_prediction(model, x, t, cond=..., uncond=..., cfg_scale=...), or use the "
        "diffusers guider asag.guidance.AdversarialSinkhornGuidance in a modular pipeline"
    )


# ---- the pipeline's frames ----------------------------------------------------------------


def pipeline_frames(pipes: Sequence[object]) -> Optional[Tuple[object, List[dict]]]:
    """The innermost pipeline of ``pipes`` running on this thread's stack, and the local
    variables of its frames (innermost first): None if the call does not come from one."""
    ids = {id(p): p for p in pipes}
    frame = sys._getframe(1)
    found, frames = None, []
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if id(owner) in ids and (found is None or owner is found):
                found = owner
                frames.append(frame.f_locals)
        frame = frame.f_back
    return (found, frames) if found is not None else None


def variable(frames: List[dict], name: str, default=None):
    for f in frames:
        if name in f:
            return f[name]
    return default


# ---- row roles -------------------------------------------------------------------------------


def _is_condition(t) -> bool:
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return False
    return (t.is_floating_point() and t.dim() >= 2) or (not t.is_floating_point() and t.dtype != torch.bool and t.dim() == 1)


def _leaves(obj, name: str):
    """(name, tensor) of a value and of the tensors one level inside lists, tuples, dicts."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            if isinstance(o, torch.Tensor):
                yield name, o
    elif isinstance(obj, dict):
        for k, o in obj.items():
            if isinstance(o, torch.Tensor):
                yield f"{name}.{k}", o


def references(frames: List[dict]) -> Tuple[list, list]:
    """The pipeline's unconditional and conditional tensors, by the names it gave them."""
    negative, positive, seen = [], [], set()
    for f in frames:
        for name, value in f.items():
            if name == "self":
                continue
            for leaf_name, t in _leaves(value, name):
                if id(t) in seen or not _is_condition(t):
                    continue
                seen.add(id(t))
                if NEGATIVE.search(leaf_name.split(".")[-1]) or NEGATIVE.search(name):
                    negative.append(t)
                elif CONDITIONING.search(leaf_name):
                    positive.append(t)
    return negative, positive


def _row_in(row: torch.Tensor, refs: list) -> bool:
    """Whether ``row`` equals a row of one of ``refs``, or begins or ends with one along its
    token dimension (a pipeline may add size-1 dimensions, or concatenate more tokens, after
    it named its embeddings)."""
    for ref in refs:
        if ref.dim() == 0 or ref.dtype.is_floating_point != row.dtype.is_floating_point:
            continue
        ref = ref.to(device=row.device, dtype=row.dtype)  # once: both matches below read it
        ref_rows = ref.reshape(ref.shape[0], -1)
        if ref_rows.shape[1] == row.numel():
            flat = row.reshape(-1)
            if any(torch.equal(flat, r) for r in ref_rows):
                return True
        elif row.dim() >= 2 and ref.dim() == row.dim() and ref.shape[2:] == row.shape[1:] and ref.shape[1] < row.shape[0]:
            n = ref.shape[1]
            for r in ref:
                if torch.equal(row[:n], r) or torch.equal(row[-n:], r):
                    return True
    return False


def _condition_args(args, kwargs, sample: torch.Tensor):
    named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        if NOT_CONDITIONING.search(name):
            continue
        for leaf_name, t in _leaves(value, name):
            if t is not sample and not NOT_CONDITIONING.search(leaf_name.split(".")[-1]) and _is_condition(t):
                yield leaf_name, t


def row_roles(args, kwargs, sample: torch.Tensor, frames: List[dict]) -> List[str]:
    """"u" or "c" for each row of the call's sample, from its conditioning arguments.
    Rows of a call with no conditioning argument at all (an unconditional model) are "c"."""
    batch = sample.shape[0]
    negative, positive = references(frames)
    candidates = list(_condition_args(args, kwargs, sample))
    if not candidates:
        return ["c"] * batch
    informative = []
    for name, t in candidates:
        if t.shape[0] == batch:
            factor = 1
        elif t.shape[0] % batch == 0:
            factor = t.shape[0] // batch  # repeated per frame: row i owns rows [i*f, (i+1)*f)
        elif t.shape[0] == 1:
            factor = 0  # broadcast over the batch
        else:
            continue
        labels = []
        for i in range(batch):
            rows = [t[0]] if factor == 0 else list(t[i * factor:(i + 1) * factor])
            kinds = {"u" if _row_in(r, negative) else ("c" if _row_in(r, positive) else None) for r in rows}
            labels.append(kinds.pop() if len(kinds) == 1 else None)
        if any(l is not None for l in labels):
            informative.append((name, labels))
    if not informative:
        names = ", ".join(n for n, _ in candidates)
        raise UnknownRole(_message(f"none of its conditioning arguments ({names}) matches the pipeline's prompt or negative-prompt variables"))
    # Arguments that show unconditional rows know both roles; the others (e.g. IP-Adapter image
    # embeddings, built from variables asag cannot see) are only used when none does.
    both = [(n, l) for n, l in informative if "u" in l]
    use = both or informative
    roles = []
    for i in range(batch):
        seen = {labels[i] for _, labels in use if labels[i] is not None}
        if len(seen) != 1:
            why = "it matches both a prompt and a negative prompt" if len(seen) > 1 else "it matches neither"
            raise UnknownRole(_message(f"row {i} of {batch}: {why} (arguments {', '.join(n for n, _ in use)})"))
        roles.append(seen.pop())
    return roles


# ---- the CFG scale and whether CFG runs -----------------------------------------------------


def _number(value) -> Optional[float]:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _attribute(pipe, name):
    try:
        return getattr(pipe, name, None)
    except Exception:  # properties of a pipeline that is not mid-call
        return None


def _dynamic_cfg(frames, pipe, t) -> Optional[float]:
    """CogVideoX's dynamic CFG: the scale of this step, which the pipeline sets after the call."""
    if variable(frames, "use_dynamic_cfg") is not True:
        return None
    w, steps = _number(variable(frames, "guidance_scale")), _number(variable(frames, "num_inference_steps"))
    if w is None or steps is None or t is None:
        return None
    return 1 + w * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)


# (what it reads, how): the first that gives a number is the weight of the conditional
# prediction in the pipeline's `u + w (c - u)`.
SCALE_RULES = (
    ("current_guidance_scale (a per-step scale, e.g. Wan's two experts)", lambda f, p, t: _number(variable(f, "current_guidance_scale"))),
    ("true_cfg_scale, when do_true_cfg (Flux, QwenImage, HunyuanVideo)", lambda f, p, t: _number(variable(f, "true_cfg_scale")) if variable(f, "do_true_cfg") is True else None),
    ("CogVideoX's dynamic CFG", _dynamic_cfg),
    ("the pipeline's guidance_scale", lambda f, p, t: _number(_attribute(p, "guidance_scale"))),
    ("the local guidance_scale", lambda f, p, t: _number(variable(f, "guidance_scale"))),
)

# (what it reads, how): the first that answers says whether this step has CFG, for a call
# without unconditional rows.
CFG_RULES = (
    ("do_true_cfg", lambda f, p: variable(f, "do_true_cfg")),
    ("do_classifier_free_truncation (Lumina2's truncated CFG)", lambda f, p: False if variable(f, "do_classifier_free_truncation") is True else None),
    ("the pipeline's do_classifier_free_guidance", lambda f, p: _attribute(p, "do_classifier_free_guidance")),
    ("the local do_classifier_free_guidance", lambda f, p: variable(f, "do_classifier_free_guidance")),
)


def cfg_scale(frames: List[dict], pipe, t: Optional[float]) -> float:
    for what, rule in SCALE_RULES:
        w = rule(frames, pipe, t)
        if w is not None:
            if w == 0:
                raise UnknownRole(_message(f"{what} is 0, so the conditional prediction has no weight"))
            return w
    raise UnknownRole(_message("the pipeline runs CFG but asag found no CFG scale variable (" + "; ".join(w for w, _ in SCALE_RULES) + ")"))


def cfg_runs(frames: List[dict], pipe) -> bool:
    for what, rule in CFG_RULES:
        answer = rule(frames, pipe)
        if isinstance(answer, bool):
            return answer
    negative, _ = references(frames)
    if negative:
        raise UnknownRole(_message("the pipeline holds negative-prompt embeddings but asag cannot tell whether this step runs CFG"))
    return False
