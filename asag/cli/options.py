"""Command-line flags: every ASAGConfig field, the pipeline call's common arguments, and method
specifications such as ``asag:scale=3,lam=2``."""

import argparse
import dataclasses
import inspect
import json
import typing
from typing import Dict, List, Optional

from ..guidance import ASAGConfig
from .loading import DTYPES, CLIError

# ASAGConfig fields as flags: the type to parse and the help line (defaults from the dataclass).
FIELD_HELP = {
    "scale": "ASAG guidance scale (0 turns it off; default: automatic, 0.5 where CFG runs, 3 where it does not)",
    "lam": "adversarial strength at the first step (it falls to lam_end along lam_schedule)",
    "iters": "Sinkhorn iterations",
    "tau": "temperature",
    "lam_end": "lam at the last step (default lam / 2)",
    "lam_schedule": "lam's path from lam to lam_end: constant, linear, cosine",
    "scale_end": "scale at the last step (default: scale)",
    "scale_schedule": "scale's path to scale_end: constant, linear, cosine",
    "start": "fraction of sampling where ASAG starts",
    "stop": "fraction of sampling where ASAG stops",
    "rescale": "guidance rescale factor in [0, 1]",
    "layers": "self-attention layers: mid, all, down, up, names, regexes or indices, comma-separated",
    "mode": "batched (one pass, bigger batch) or sequential (a second pass)",
    "variant": "sinkhorn (ASAG); identity, noise, blur for comparisons",
}


def _field_type(field):
    hint = typing.get_type_hints(ASAGConfig)[field.name]
    for candidate in (int, float, str):
        if hint is candidate or candidate in typing.get_args(hint):
            return candidate
    return str


def parse_layers(text: str):
    """``mid`` / ``all`` / ``3`` / ``mid,-1`` / a name or regex: a selection for ASAGConfig."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    parsed = [int(item) if item.lstrip("-").isdigit() else item for item in items]
    return parsed[0] if len(parsed) == 1 else parsed


def convert(name: str, text: str):
    """A string value for ASAGConfig field ``name``, converted to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(ASAGConfig)}
    if name not in fields:
        raise CLIError(f"{name!r} is not an ASAG setting; settings: {', '.join(fields)}")
    if name == "layers":
        return parse_layers(text)
    kind = _field_type(fields[name])
    try:
        return kind(text)
    except ValueError:
        raise CLIError(f"ASAG setting {name} expects {kind.__name__}, got {text!r}") from None


def add_asag_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ASAG settings (every ASAGConfig field; unset: asag's defaults)")
    for field in dataclasses.fields(ASAGConfig):
        flag = "--" + field.name.replace("_", "-")
        default = "" if field.default is None else f" (default {field.default})"
        group.add_argument(flag, dest="asag_" + field.name, metavar=field.name.upper(), default=None,
                           help=FIELD_HELP.get(field.name, field.name) + default)


def asag_settings(args) -> Dict:
    """The ASAG settings given on the command line, typed and validated by ASAGConfig."""
    settings = {}
    for field in dataclasses.fields(ASAGConfig):
        value = getattr(args, "asag_" + field.name, None)
        if value is not None:
            settings[field.name] = convert(field.name, value)
    return settings


def validated(settings: Dict) -> ASAGConfig:
    try:
        return ASAGConfig(**settings)
    except (TypeError, ValueError) as error:
        raise CLIError(f"ASAG settings: {error}") from None


def add_model_flags(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("model", nargs="?" if optional else None,
                        help="a diffusers pipeline: its folder (save_pretrained) or a repository id in the local Hugging Face cache")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda if there is one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float16 on a GPU, float32 on a CPU")
    parser.add_argument("--weights-variant", dest="weights_variant", default=None, help="weights variant to load (e.g. fp16)")


def add_call_flags(parser: argparse.ArgumentParser, prompts: bool = True) -> None:
    group = parser.add_argument_group("pipeline call (unset: the pipeline's own defaults)")
    if prompts:
        group.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    group.add_argument("--negative-prompt", default=None)
    group.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    group.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (guidance_scale)")
    group.add_argument("--height", type=int, default=None)
    group.add_argument("--width", type=int, default=None)
    group.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                       help="any other argument of the pipeline's __call__ (VALUE as JSON, else a string)")


def _parameters(pipe) -> Dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def takes(pipe, name: str) -> bool:
    """Whether ``name`` is a named argument of the pipeline's ``__call__`` (its ``**kwargs``, where
    diffusers has them, swallow unknown names silently: they do not count)."""
    return name in _parameters(pipe)


def call_kwargs(pipe, args) -> Dict:
    """The call arguments given on the command line, each checked against the pipeline's
    ``__call__`` so that a flag that does not apply is an error, not silently ignored."""
    given = {}
    for flag, name in (("--negative-prompt", "negative_prompt"), ("--steps", "num_inference_steps"),
                       ("--guidance-scale", "guidance_scale"), ("--height", "height"), ("--width", "width")):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            given[flag] = (name, value)
    for item in args.arg:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--arg expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        given[f"--arg {key}"] = (key, value)
    kwargs = {}
    for flag, (name, value) in given.items():
        if not takes(pipe, name):
            raise CLIError(f"{flag} does not apply to {type(pipe).__name__}: its __call__ has no {name!r} argument")
        kwargs[name] = value
    return kwargs


@dataclasses.dataclass
class MethodSpec:
    """One guidance method of ``compare``/``evaluate``: ``none``, ``cfg``, ``pag[:k=v,...]``
    or ``asag[:k=v,...]`` (k: an ASAGConfig field; for pag: scale, layers)."""

    kind: str
    settings: Dict
    label: str

    @property
    def slug(self) -> str:
        """A folder name for the method's images."""
        return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.label.replace(":", "_").replace(",", "_"))


def parse_method(text: str, base: Optional[Dict] = None) -> MethodSpec:
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in ("none", "cfg", "pag", "asag"):
        raise CLIError(f"--method {text!r}: a method is none, cfg, pag[:scale=S,layers=L] or asag[:key=value,...]")
    settings = {}
    for item in filter(None, (part.strip() for part in _split_settings(rest))):
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--method {text!r}: settings are key=value, got {item!r}")
        key = key.strip().replace("-", "_")
        if kind == "asag":
            settings[key] = convert(key, value.strip())
        elif kind == "pag" and key in ("scale", "layers"):
            settings[key] = float(value) if key == "scale" else parse_layers(value)
        else:
            raise CLIError(f"--method {text!r}: {kind} takes no setting {key!r}")
    if kind == "asag":
        validated(dict(base or {}, **settings))
    return MethodSpec(kind, settings, text.strip())


def _split_settings(text: str) -> List[str]:
    """Splits ``scale=2,layers=mid,all,lam=3`` at the commas that start a new key=value."""
    parts: List[str] = []
    for piece in text.split(","):
        if "=" in piece or not parts:
            parts.append(piece)
        else:
            parts[-1] += "," + piece
    return parts
