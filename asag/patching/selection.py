"""Which attention layers ASAG perturbs.

A selection is one item or a list of items, each of them:

- a preset: ``"mid"`` (default: the self-attention layers of a UNet's ``mid_block``, else the
  middle one of the model's self/joint-attention layers), ``"all"``, ``"down"``, ``"up"``
  (layers under ``down_blocks`` / ``up_blocks``);
- an exact layer name (``"mid_block.attentions.0.transformer_blocks.0.attn1"``) or the name of
  a module above layers (``"transformer_blocks.1"`` selects the layers inside block 1, never
  those of block 10: names match whole dotted components, unlike diffusers' PAG, whose
  ``re.search`` also picks ``blocks.10`` for ``blocks.1``);
- a regular expression, matched against the whole name (``r"transformer_blocks\\.(1|2)\\..*"``);
- an int: an index into the list of self- and joint-attention layers; negative counts from
  the end.

Presets and indices reach self- and joint-attention layers; temporal layers (attention across
a video's frames) are perturbed only when a name or pattern selects them.
"""

import re
from typing import List, Sequence, Union

from .discovery import LayerInfo

Selection = Union[None, str, int, Sequence[Union[str, int]]]
PRESETS = ("mid", "all", "down", "up")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _mid(layers: List[LayerInfo]) -> List[LayerInfo]:
    in_mid_block = [l for l in layers if _under(l.name, "mid_block")]
    if in_mid_block:
        return in_mid_block
    return [layers[len(layers) // 2]] if layers else []


def _match_one(item, layers: List[LayerInfo], perturbable: List[LayerInfo]) -> List[LayerInfo]:
    """The layers one selection item names (presets and indices among ``perturbable``)."""
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise TypeError(f"layers items must be str or int, got {type(item).__name__}")
    if isinstance(item, int):
        if not -len(perturbable) <= item < len(perturbable):
            raise ValueError(
                f"layer index {item} is out of range: the model has {len(perturbable)} "
                "self/joint-attention layers"
            )
        return [perturbable[item]]
    if item == "mid":
        return _mid(perturbable)
    if item == "all":
        return list(perturbable)
    if item in ("down", "up"):
        return [l for l in perturbable if _under(l.name, f"{item}_blocks")]
    hits = [l for l in layers if _under(l.name, item)]
    if not hits:
        try:
            pattern = re.compile(item)
        except re.error:
            pattern = None
        if pattern is not None:
            hits = [l for l in layers if pattern.fullmatch(l.name)]
    return hits


def select_layers(layers: List[LayerInfo], selection: Selection, *, require_kind: bool) -> List[LayerInfo]:
    """The layers a selection names. ``require_kind``: the layers' kinds are known (probed),
    so names that reach only cross-attention or unsupported layers are errors too."""
    items = ["mid"] if selection is None else ([selection] if isinstance(selection, (str, int)) else list(selection))
    if not items:
        raise ValueError("layers is empty: name at least one layer, or use 'mid' or 'all'")
    unknown_ok = lambda l: not require_kind and l.kind == "unknown"  # noqa: E731
    spatial = [l for l in layers if l.kind in ("self", "joint") or unknown_ok(l)]
    chosen: List[LayerInfo] = []
    for item in items:
        hits = _match_one(item, layers, spatial)
        usable = [l for l in hits if l.perturbable or unknown_ok(l)]
        if not usable:
            raise ValueError(_no_match_message(item, hits, layers))
        chosen += [l for l in usable if l not in chosen]
    return sorted(chosen, key=lambda l: l.index)


def _no_match_message(item, hits: List[LayerInfo], layers: List[LayerInfo]) -> str:
    listing = "\n  ".join(l.describe() for l in layers) or "(none)"
    if item in PRESETS and not any(l.perturbable or l.kind == "unknown" for l in layers):
        return (
            f"layers={item!r}: the model has no self- or joint-attention layer that ASAG can "
            f"perturb. Its attention layers:\n  {listing}"
        )
    if hits:
        why = "; ".join(f"{l.name} is {l.kind}" + (f" ({l.reason})" if l.reason else "") for l in hits[:5])
        return (
            f"layers={item!r} selects no self- or joint-attention layer: {why}. "
            f"ASAG perturbs self-attention (and joint attention's image tokens) only. The model's attention layers:\n  {listing}"
        )
    return (
        f"layers={item!r} matches no attention layer (presets: {', '.join(PRESETS)}; names match "
        f"whole dotted components or a full regular expression). The model's attention layers:\n  {listing}"
    )
