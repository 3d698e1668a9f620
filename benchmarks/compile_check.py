"""ASAG under torch.compile (inductor): recompiles and graph breaks over a whole sampling run.

A tiny random-weight Stable Diffusion pipeline (the shape of SD1.5 at toy size) samples 30
steps with asag's default schedules (lam changes at every step), its UNet compiled by inductor
after ``asag.enable``, before it, or in place; and the shipped digits DiT, patched by
``asag.apply`` and compiled, runs a hand-written loop through ``asag.guided_prediction``. Printed per case: the recompiles,
the graph breaks inside the perturbed layers (expected: asag's layer hooks and its SDPA
replacement run eagerly) and outside them (expected: none), the time, and the largest
difference from the same run uncompiled.

    python benchmarks/compile_check.py [--steps 30]
"""

import argparse
import logging
import platform
import time

import torch
import torch._dynamo.guards  # noqa: F401  (creates the loggers counted below)
import torch._dynamo.symbolic_convert  # noqa: F401
from torch._dynamo.utils import counters

import asag

CASES = (
    "asag.enable, then compile",
    "compile, then asag.enable",
    "asag.enable, then unet.compile() in place",
    "asag.apply on a DiT, compiled, guided_prediction loop",
)
INSIDE = ("_PatchedForward", "route")  # asag's code in the perturbed layers


class _Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.recompiles = 0

    def emit(self, record):
        if "Recompiling function" in record.getMessage():
            self.recompiles += 1


def tiny_sd_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), negative_prompt_embeds=torch.randn(1, 5, 24, generator=g))
    return pipe, embeds


def sample(pipe, embeds, steps):
    with torch.no_grad():
        return pipe(num_inference_steps=steps, height=16, width=16, guidance_scale=5.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0), **embeds).images


def dit_loop(model, steps: int) -> torch.Tensor:
    """A hand-written sampling loop on the shipped digits DiT (timm attention), ASAG through
    asag.guided_prediction with its defaults: lam follows its cosine schedule step by step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    labels, null = torch.tensor([1, 2, 3, 4]), torch.full((4,), 10)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((4,), 999 - i * (999 // steps))
            eps = asag.guided_prediction(model, x, t, cond={"y": labels}, uncond={"y": null}, cfg_scale=3.0,
                                         progress=i / max(steps - 1, 1))
            x = x - 0.05 * eps
            outs.append(eps)
    return torch.stack(outs)


def run_case(order: str, steps: int, reference: dict, count: _Count) -> dict:
    torch._dynamo.reset()
    counters.clear()
    count.recompiles = 0
    if order == "asag.apply on a DiT, compiled, guided_prediction loop":
        from asag.demo.models import load

        model = load("dit")[0]
        asag.apply(model)
        start = time.perf_counter()
        out = dit_loop(torch.compile(model), steps)
        seconds = time.perf_counter() - start
        asag.remove(model)
        return _row(order, count, seconds, (out - reference["dit"]).abs().max().item())
    pipe, embeds = tiny_sd_pipeline()
    start = time.perf_counter()
    if order == "compile, then asag.enable":
        pipe.unet = torch.compile(pipe.unet)
        asag.enable(pipe)
    elif order == "asag.enable, then unet.compile() in place":
        asag.enable(pipe)
        pipe.unet.compile()
    else:
        asag.enable(pipe)
        pipe.unet = torch.compile(pipe.unet)
    images = sample(pipe, embeds, steps)
    seconds = time.perf_counter() - start
    asag.disable(pipe)
    return _row(order, count, seconds, (images - reference["sd"]).abs().max().item())


def _row(case, count, seconds, max_diff) -> dict:
    inside = sum(n for reason, n in counters["graph_break"].items() if any(name in reason for name in INSIDE))
    total = sum(counters["graph_break"].values())
    return dict(case=case, recompiles=count.recompiles, breaks_inside=inside, breaks_outside=total - inside,
                seconds=seconds, max_diff=max_diff)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    count = _Count()
    for name in ("torch._dynamo.guards.__recompiles",):
        logging.getLogger(name).addHandler(count)
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo.guards.__recompiles").propagate = False

    from asag.demo.models import load

    pipe, embeds = tiny_sd_pipeline()
    with asag.enable(pipe):
        reference = {"sd": sample(pipe, embeds, args.steps)}
    dit = load("dit")[0]
    reference["dit"] = dit_loop(dit, args.steps)
    asag.remove(dit)
    rows = [run_case(order, args.steps, reference, count) for order in CASES]
    print(f"torch {torch.__version__}, inductor on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; tiny SD pipeline, {args.steps} steps, asag defaults (layers 'mid')")
    print("| case | recompiles | graph breaks in perturbed layers | graph breaks elsewhere | time (s) | max diff vs eager |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['recompiles']} | {r['breaks_inside']} | {r['breaks_outside']} | {r['seconds']:.1f} | {r['max_diff']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
