"""Calling a pipeline with one guidance method: no guidance, CFG, diffusers' PAG or ASAG."""

import time
from typing import Dict, List, Tuple

import torch

from ..guidance import ASAGConfig, enable
from .loading import CLIError
from .options import MethodSpec, takes, validated


def _auto_classes():
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
    from diffusers.pipelines import auto_pipeline as auto

    return [
        (AutoPipelineForText2Image, auto.AUTO_TEXT2IMAGE_PIPELINES_MAPPING),
        (AutoPipelineForImage2Image, auto.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING),
        (AutoPipelineForInpainting, auto.AUTO_INPAINT_PIPELINES_MAPPING),
    ]


def pag_pipeline(pipe, layers="mid"):
    """diffusers' PAG counterpart of ``pipe`` (sharing its components), or CLIError when
    diffusers has none for this pipeline."""
    name = type(pipe).__name__
    for auto, mapping in _auto_classes():
        if name in {cls.__name__ for cls in mapping.values()}:
            try:
                return auto.from_pipe(pipe, enable_pag=True, pag_applied_layers=layers)
            except (ValueError, KeyError) as error:
                raise CLIError(f"diffusers has no PAG pipeline for {name} ({error})") from None
    raise CLIError(f"diffusers has no PAG pipeline for {name}: PAG exists for some text-to-image, "
                   "image-to-image and inpainting pipelines (SD 1.x/2.x, SDXL, SD3, PixArt, HunyuanDiT, Kolors...)")


class Runner:
    """Runs one pipeline with any method; ``base`` holds the ASAG settings from the command
    line's flags, which ``asag:key=value`` methods override."""

    def __init__(self, pipe, base: Dict):
        self.pipe, self.base = pipe, dict(base)
        self._pag = {}
        self.scales_used = []  # the last asag call's scale per guided step

    def check(self, method: MethodSpec) -> None:
        """CLIError when ``method`` cannot run on this pipeline (before any image is made)."""
        if method.kind == "none" and not takes(self.pipe, "guidance_scale"):
            return  # an unguided pipeline: none is its plain output
        if method.kind == "cfg" and not takes(self.pipe, "guidance_scale"):
            raise CLIError(f"--method cfg does not apply to {type(self.pipe).__name__}: it takes no guidance_scale")
        if method.kind == "pag":
            self._pag_pipe(method)
        if method.kind == "asag":
            try:  # asag refuses some pipelines (e.g. diffusers' own PAG ones): say so before any image
                enable(self.pipe, **vars(self.config(method))).disable()
            except (TypeError, ValueError) as error:
                raise CLIError(f"asag cannot guide {type(self.pipe).__name__}: {error}") from None

    def config(self, method: MethodSpec) -> ASAGConfig:
        return validated(dict(self.base, **method.settings))

    def _pag_pipe(self, method: MethodSpec):
        layers = method.settings.get("layers", "mid")
        key = str(layers)
        if key not in self._pag:
            self._pag[key] = pag_pipeline(self.pipe, layers)
            self._pag[key].set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        return self._pag[key]

    def describe(self, method: MethodSpec) -> Dict:
        """The method's full settings, for the images' metadata."""
        if method.kind == "asag":
            from dataclasses import asdict

            # The scales the steps used: with the automatic scale (scale None) they say which
            # one the pipeline's CFG picked.
            used = self.scales_used
            return dict(method="asag", asag=asdict(self.config(method)),
                        asag_scales_used=[round(used[0], 6), round(used[-1], 6)] if used else [])
        if method.kind == "pag":
            return dict(method="pag", pag=dict(scale=method.settings.get("scale", 3.0), layers=method.settings.get("layers", "mid")))
        return dict(method=method.kind)

    def __call__(self, method: MethodSpec, kwargs: Dict, seed: int, device: str) -> Tuple[object, float]:
        """(pipeline output, seconds) for one call with ``generator`` seeded by ``seed``."""
        kwargs = dict(kwargs)
        pipe = self.pipe
        if method.kind == "none" and takes(pipe, "guidance_scale"):
            kwargs["guidance_scale"] = 1.0
        if method.kind == "pag":
            pipe = self._pag_pipe(method)
            kwargs["pag_scale"] = method.settings.get("scale", 3.0)
        if takes(pipe, "generator"):
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
        _sync(device)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                if method.kind == "asag":
                    with enable(pipe, **vars(self.config(method))) as guidance:
                        output = pipe(**kwargs)
                    self.scales_used = list(guidance.scales)
                else:
                    output = pipe(**kwargs)
        except (ValueError, TypeError) as error:  # the pipeline's own checks of its arguments
            raise CLIError(f"{type(pipe).__name__} refused the call ({method.label}): {error}") from error
        _sync(device)
        return output, time.perf_counter() - start


def _sync(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def default_methods(runner: Runner) -> List[MethodSpec]:
    """none, cfg (when the pipeline has CFG), pag (when diffusers has it), asag."""
    from .options import parse_method

    methods = [parse_method("none")]
    if takes(runner.pipe, "guidance_scale"):
        methods.append(parse_method("cfg"))
        try:
            runner.check(parse_method("pag"))
            methods.append(parse_method("pag"))
        except CLIError:
            pass
    methods.append(parse_method("asag"))
    return methods
