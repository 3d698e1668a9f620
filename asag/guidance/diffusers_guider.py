"""ASAG as a diffusers guider (``BaseGuidance``): for modular and guider-based pipelines.

It follows the contract of diffusers' ``PerturbedAttentionGuidance``: up to three
predictions per step, ``pred_cond``, ``pred_uncond`` (with CFG) and ``pred_cond_adv``
(the conditional inputs again, run with Sinkhorn attention in the selected layers, which
``prepare_models`` switches on and ``cleanup_models`` off).
"""

import math
from typing import Any, Dict, List, Optional

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..patching import apply as apply_asag
from ..patching.apply import unwrap
from ..patching.handle import existing_handle
from .config import ASAGConfig
from .formula import combine, rescale


class AdversarialSinkhornGuidance(BaseGuidance):
    """Adversarial Sinkhorn Attention Guidance (arXiv 2511.07499) as a diffusers guider.

    ``pred = pred_uncond + guidance_scale (pred_cond - pred_uncond)
              + asag_scale(t) (pred_cond - pred_cond_adv)``

    Args:
        guidance_scale: CFG scale (<= 1 turns CFG off, as in diffusers).
        asag_scale, asag_scale_end, asag_scale_schedule: the ASAG scale and its schedule
            (``asag_scale=None``: ASAGConfig's automatic scale, by whether CFG runs).
        lam, lam_end, lam_schedule, iters, tau: the Sinkhorn attention (see ASAGConfig; lam is
            the first step's value, falling to lam_end along lam_schedule).
        layers: which self-attention layers (see asag.patching.selection).
        guidance_rescale: rescale factor in [0, 1] applied after the combination.
        start, stop: the fraction of sampling during which guidance runs.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_adv"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        asag_scale: Optional[float] = ASAGConfig.scale,
        lam: float = ASAGConfig.lam,
        iters: int = ASAGConfig.iters,
        tau: float = ASAGConfig.tau,
        lam_end: Optional[float] = None,
        lam_schedule: str = "cosine",
        asag_scale_end: Optional[float] = None,
        asag_scale_schedule: str = "constant",
        layers: Any = "mid",
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.asag = ASAGConfig(
            scale=asag_scale, lam=lam, iters=iters, tau=tau, lam_end=lam_end, lam_schedule=lam_schedule,
            scale_end=asag_scale_end, scale_schedule=asag_scale_schedule, start=start, stop=stop,
            rescale=guidance_rescale, layers=layers,
        )
        self._handle = None
        self._owns_handle = False
        self._key = ("asag guider", id(self))

    # ---- state -----------------------------------------------------------------------------

    def _progress(self) -> float:
        if self._num_inference_steps is None or self._step is None:
            return 0.0
        return self._step / max(self._num_inference_steps - 1, 1)

    def _is_cfg_enabled(self) -> bool:
        return self._enabled and not math.isclose(self.guidance_scale, 1.0) and self.guidance_scale > 1.0

    def _is_asag_enabled(self) -> bool:
        return self._enabled and self.asag.active_at(self._progress())

    @property
    def num_conditions(self) -> int:
        return 1 + int(self._is_cfg_enabled()) + int(self._is_asag_enabled())

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared in (1, 3) or (self._count_prepared == 2 and not self._is_cfg_enabled())

    def _predictions(self) -> List[str]:
        names = ["pred_cond"]
        if self._is_cfg_enabled():
            names.append("pred_uncond")
        if self._is_asag_enabled():
            names.append("pred_cond_adv")
        return names

    # ---- the contract ------------------------------------------------------------------------

    def _batches(self, make) -> list:
        names = self._predictions()
        return [make(0 if name != "pred_uncond" else 1, name) for name in names]

    def prepare_inputs(self, data: Dict[str, Any]) -> list:
        return self._batches(lambda idx, name: self._prepare_batch(data, idx, name))

    def prepare_inputs_from_block_state(self, data, input_fields) -> list:
        return self._batches(lambda idx, name: self._prepare_batch_from_block_state(input_fields, data, idx, name))

    def _is_adversarial_pass(self) -> bool:
        return self._is_asag_enabled() and self._count_prepared == len(self._predictions())

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if not self._is_adversarial_pass():
            return
        model = unwrap(denoiser)
        handle = self._handle
        if handle is None or handle.removed or handle.model is not model:
            existing = existing_handle(model)
            self._owns_handle = existing is None
            handle = self._handle = existing if existing is not None else apply_asag(model, layers=self.asag.layers)
        elif self._owns_handle:
            handle.attach()  # hooks only while this guider's adversarial pass runs
        handle._add_user(self._key, self.asag.layers)
        handle._begin_call(self.asag.perturbation(self._progress()), self._key, nested=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        """Ends the adversarial pass. The hooks asag added go with it (the probe's findings are
        kept for the next pass), so swapping this guider out leaves the denoiser as it was."""
        handle = self._handle
        if handle is None or handle.removed:
            return
        handle._end_call()
        handle._remove_user(self._key)
        if self._owns_handle:
            handle.detach()

    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: Optional[torch.Tensor] = None,
        pred_cond_adv: Optional[torch.Tensor] = None,
    ) -> GuiderOutput:
        pred = pred_cond
        if pred_cond_adv is not None:
            scale = self.asag.scale_at(self._progress(), cfg=pred_uncond is not None)
            pred = combine(pred_cond, pred_cond_adv, scale, eps_uncond=pred_uncond, cfg_scale=self.guidance_scale)
        elif pred_uncond is not None:
            pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        pred = rescale(pred, pred_cond, self.asag.rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
