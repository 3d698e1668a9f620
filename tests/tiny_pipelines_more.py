"""More tiny random-weight diffusers pipelines on CPU (no downloads, prompt embeddings passed
directly), registered into ``tiny_pipelines.PIPELINES`` on import, and :func:`variant`, which
turns any registered pipeline's call kwargs into its one-prompt, two-prompt or
two-images-per-prompt form.

``python tiny_pipelines_more.py`` builds every registered pipeline (old and new), runs each
variant, and checks finite, seed-deterministic outputs.
"""

import zlib

import torch

import diffusers
import tiny_models
import tiny_pipelines
from tiny_models import _randn
from tiny_pipelines import PIPELINES, _common, _embeds, pipeline, tiny_vae

STEPS = 2


# ---- video outputs readable as `.images` ------------------------------------------------------
# tiny_pipelines.run returns `pipe(...).images`; the video pipelines' outputs hold `.frames`.
# Give their output classes a read-only `images` alias (no pipeline or output behaviour changes).


def _alias_frames_as_images():
    from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput
    from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput
    from diffusers.pipelines.ltx.pipeline_output import LTXPipelineOutput
    from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

    for cls in (WanPipelineOutput, CogVideoXPipelineOutput, LTXPipelineOutput, AnimateDiffPipelineOutput):
        if not hasattr(cls, "images"):
            cls.images = property(lambda self: self.frames)


_alias_frames_as_images()


def _steps(**extra):
    """tiny_pipelines._common with 2 inference steps."""
    kwargs = _common(**extra)
    kwargs["num_inference_steps"] = STEPS
    return kwargs


def _vae8(latent_channels=4):
    """A tiny AutoencoderKL with a spatial factor of 8 (for pipelines that assume it)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=latent_channels, norm_num_groups=4, sample_size=64, layers_per_block=1,
    ).eval()


# ---- SDXL img2img / inpaint -------------------------------------------------------------------


@pipeline("sdxl-img2img")
def sdxl_img2img():
    pipe, _ = tiny_pipelines.sdxl()
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    image = _randn(1, 3, 16, 16, seed=3).clamp(-1, 1) * 0.5 + 0.5
    # 4 scheduled steps at strength 0.5: 2 denoising steps.
    kwargs = _common(guidance_scale=5.0, image=image, strength=0.5, **_embeds(24, pooled=8))
    kwargs.pop("height"), kwargs.pop("width")
    return pipe, kwargs


@pipeline("sdxl-inpaint")
def sdxl_inpaint():
    pipe, _ = tiny_pipelines.sdxl()
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**pipe.components)
    image = _randn(1, 3, 16, 16, seed=3).clamp(-1, 1) * 0.5 + 0.5
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1.0
    # 4 scheduled steps at strength 0.5: 2 denoising steps.
    kwargs = _common(guidance_scale=5.0, image=image, mask_image=mask, strength=0.5, **_embeds(24, pooled=8))
    return pipe, kwargs


# ---- PixArt-alpha -----------------------------------------------------------------------------


@pipeline("pixart-alpha")
def pixart_alpha():
    transformer, _ = tiny_models.build("pixart")
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
    )
    kwargs = _steps(
        guidance_scale=4.5, prompt_embeds=_randn(1, 6, 12, seed=1), negative_prompt_embeds=_randn(1, 6, 12, seed=2),
        prompt_attention_mask=torch.ones(1, 6), negative_prompt_attention_mask=torch.ones(1, 6),
        use_resolution_binning=False, negative_prompt=None,
    )
    return pipe, kwargs


# ---- SD3 with skip-layer guidance -------------------------------------------------------------


@pipeline("sd3-skip-layers")
def sd3_skip_layers():
    pipe, kwargs = tiny_pipelines.sd3()
    # The pipeline applies SLG where `i > steps * start and i < steps * stop` (strict): a start
    # of 0.0 would leave out step 0, so a negative start makes it apply at every step.
    kwargs.update(num_inference_steps=STEPS, skip_guidance_layers=[1], skip_layer_guidance_start=-1.0,
                  skip_layer_guidance_stop=1.0)
    return pipe, kwargs


# ---- Flux with true CFG -----------------------------------------------------------------------


@pipeline("flux-true-cfg")
def flux_true_cfg():
    pipe, kwargs = tiny_pipelines.flux()
    kwargs.update(num_inference_steps=STEPS, true_cfg_scale=4.0, negative_prompt_embeds=_randn(1, 5, 16, seed=3),
                  negative_pooled_prompt_embeds=_randn(1, 8, seed=4))
    return pipe, kwargs


# ---- Wan --------------------------------------------------------------------------------------


@pipeline("wan")
def wan():
    transformer, _ = tiny_models.build("wan")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.0, 1.5, 0.8, 1.2],
    ).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    # 64x64, 5 frames -> latents (4, 2, 8, 8) -> 2 * 4 * 4 = 32 tokens; text 7 tokens.
    kwargs = dict(height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                  prompt_embeds=_randn(1, 7, 16, seed=1), negative_prompt_embeds=_randn(1, 7, 16, seed=2))
    return pipe, kwargs


# ---- Lumina2 ----------------------------------------------------------------------------------


@pipeline("lumina2")
def lumina2():
    torch.manual_seed(0)
    transformer = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32),
        cap_feat_dim=12,
    ).eval()
    pipe = diffusers.Lumina2Pipeline(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                     vae=tiny_vae(shift_factor=0.1), text_encoder=None, tokenizer=None)
    # The pipeline's latent factor is 8 (hard-coded): 64x64 -> latents 8x8 -> 16 tokens; the
    # tiny VAE (factor 2) decodes them to 16x16. Text 6 tokens. cfg_trunc_ratio stays 1.0.
    kwargs = dict(height=64, width=64, num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
                  prompt_embeds=_randn(1, 6, 12, seed=1), negative_prompt_embeds=_randn(1, 6, 12, seed=2),
                  prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))
    return pipe, kwargs


# ---- CogVideoX --------------------------------------------------------------------------------


def _cogvideox_kwargs(**extra):
    # 64x64, 5 frames -> latents (2, 4, 8, 8) -> 2 * 16 = 32 tokens; text 5 tokens (the
    # transformer's max_text_seq_length).
    return dict(height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2), **extra)


@pipeline("cogvideox")
def cogvideox():
    transformer, _ = tiny_models.build("cogvideox")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    return pipe, _cogvideox_kwargs()


@pipeline("cogvideox-dynamic")
def cogvideox_dynamic():
    pipe, _ = cogvideox()
    return pipe, _cogvideox_kwargs(use_dynamic_cfg=True)


# ---- QwenImage --------------------------------------------------------------------------------


@pipeline("qwenimage")
def qwenimage():
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.0, 1.5, 0.8, 1.2],
    ).eval()
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                       text_encoder=None, tokenizer=None, transformer=transformer)
    # 32x32 -> latents 8x8 (factor 4) -> packed 2x2 -> 16 tokens; text 7 tokens.
    kwargs = dict(height=32, width=32, num_inference_steps=STEPS, true_cfg_scale=4.0, output_type="pt",
                  prompt_embeds=_randn(1, 7, 16, seed=1), negative_prompt_embeds=_randn(1, 7, 16, seed=2),
                  prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
                  negative_prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long))
    return pipe, kwargs


# ---- HunyuanDiT -------------------------------------------------------------------------------


@pipeline("hunyuandit")
def hunyuandit():
    transformer, _ = tiny_models.build("hunyuan-dit")
    pipe = diffusers.HunyuanDiTPipeline(
        vae=_vae8(), text_encoder=None, tokenizer=None, transformer=transformer,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None,
    )
    # The pipeline's rotary grid assumes a latent factor of 8: 64x64 -> latents 8x8 -> 16
    # tokens. Text: 5 tokens (CLIP-like, dim 16) and 6 tokens (T5-like, dim 16), the
    # transformer's text_len and text_len_t5.
    kwargs = dict(
        height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
        use_resolution_binning=False,
        prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
        prompt_attention_mask=torch.ones(1, 5, dtype=torch.long),
        negative_prompt_attention_mask=torch.ones(1, 5, dtype=torch.long),
        prompt_embeds_2=_randn(1, 6, 16, seed=3), negative_prompt_embeds_2=_randn(1, 6, 16, seed=4),
        prompt_attention_mask_2=torch.ones(1, 6, dtype=torch.long),
        negative_prompt_attention_mask_2=torch.ones(1, 6, dtype=torch.long),
    )
    return pipe, kwargs


# ---- LTX-Video --------------------------------------------------------------------------------


@pipeline("ltx")
def ltx():
    transformer, _ = tiny_models.build("ltx-video")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    pipe = diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                 tokenizer=None, transformer=transformer)
    # The pipeline wants sizes divisible by 32; the VAE compresses 8x in space and time:
    # 32x32, 9 frames -> latents (8, 2, 4, 4) -> 32 tokens; text 6 tokens.
    kwargs = dict(height=32, width=32, num_frames=9, num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
                  prompt_embeds=_randn(1, 6, 16, seed=1), negative_prompt_embeds=_randn(1, 6, 16, seed=2),
                  prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))
    return pipe, kwargs


# ---- AnimateDiff ------------------------------------------------------------------------------


@pipeline("animatediff")
def animatediff():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    torch.manual_seed(1)
    adapter = diffusers.MotionAdapter(
        block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=4,
        motion_num_attention_heads=2, motion_max_seq_length=8,
    ).eval()
    pipe = diffusers.AnimateDiffPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, motion_adapter=adapter,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1, beta_schedule="linear"),
        feature_extractor=None, image_encoder=None,
    )
    pipe.unet.eval()
    # 16x16, 4 frames -> latents (4, 4, 8, 8); text 5 tokens (dim 24), repeated per frame.
    kwargs = _steps(guidance_scale=5.0, num_frames=4, **_embeds(24))
    return pipe, kwargs


# ---- DiT (class-conditional) ------------------------------------------------------------------


@pipeline("dit")
def dit():
    torch.manual_seed(0)
    # num_embeds_ada_norm=1000: the pipeline's null class is 1000 (the table's extra row).
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=8,
    ).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(),
                                 scheduler=diffusers.DDIMScheduler(clip_sample=False))
    return pipe, dict(class_labels=[1], guidance_scale=4.0, num_inference_steps=STEPS, output_type="pt")


# ---- SD with PAG ------------------------------------------------------------------------------


@pipeline("sd-pag")
def sd_pag():
    pipe, _ = tiny_pipelines.sd()
    pipe = diffusers.StableDiffusionPAGPipeline(**pipe.components, requires_safety_checker=False,
                                                pag_applied_layers=["mid"])
    return pipe, _steps(guidance_scale=5.0, pag_scale=3.0, **_embeds())


# ---- variants: one prompt, two prompts, two images per prompt ---------------------------------

KINDS = ("one", "two_prompts", "two_images")

# The argument that asks for several outputs per prompt, where it is not num_images_per_prompt.
PER_PROMPT_ARG = {"wan": "num_videos_per_prompt", "cogvideox": "num_videos_per_prompt",
                  "cogvideox-dynamic": "num_videos_per_prompt", "ltx": "num_videos_per_prompt",
                  "animatediff": "num_videos_per_prompt"}

# Variants a pipeline cannot run, and why.
UNSUPPORTED = {
    ("sd3", "two_images"): (
        "StableDiffusion3Pipeline.encode_prompt repeats embeddings per image only when it encodes text itself; "
        "passed prompt_embeds / pooled_prompt_embeds (and negatives) stay at batch 1 while the latents have "
        "batch 2, and the batched CFG call fails (pooled batch 2 vs latents batch 4)"),
    ("sd3-skip-layers", "two_images"): (
        "as for sd3: passed prompt embeddings are not repeated per image, so the batched CFG call fails"),
    ("cogvideox", "two_images"): "CogVideoXPipeline.__call__ sets num_videos_per_prompt = 1 whatever is passed",
    ("cogvideox-dynamic", "two_images"): "CogVideoXPipeline.__call__ sets num_videos_per_prompt = 1 whatever is passed",
    ("animatediff", "two_images"): "AnimateDiffPipeline.__call__ sets num_videos_per_prompt = 1 whatever is passed",
    ("lumina2", "two_images"): (
        "Lumina2Pipeline.encode_prompt repeats passed negative_prompt_embeds / negative_prompt_attention_mask "
        "per image only when it encodes the negative prompt itself, so the negative call gets batch 1 against "
        "latents of batch 2 and fails; passing them already repeated fails check_inputs (prompt_embeds and "
        "negative_prompt_embeds must have the same shape)"),
    ("ltx", "two_images"): (
        "LTXPipeline.encode_prompt repeats embeddings and masks per video only when it encodes text itself; "
        "passed ones stay at batch 1 and the batched CFG call fails (embeddings batch 2 vs latents batch 4)"),
    ("dit", "two_images"): (
        "DiTPipeline.__call__ has no num_images_per_prompt argument (one image per entry of class_labels)"),
}

# Passed tensors that the pipeline does not repeat per image itself (it does so only for the
# ones it computes), so "two_images" passes them already repeated to the latents' batch.
REPEATED_FOR_TWO_IMAGES = {
    # HunyuanDiTPipeline.encode_prompt repeats passed embeddings but not passed attention masks.
    "hunyuandit": ("prompt_attention_mask", "negative_prompt_attention_mask", "prompt_attention_mask_2",
                   "negative_prompt_attention_mask_2"),
}


def _second_row(key, value):
    """A row for a second prompt, different from the first: a fresh draw (seeded by the
    argument's name) for embeddings; for attention masks, the first row with its last token
    masked out (a shorter prompt)."""
    row = value[:1].clone()
    if "mask" in key:
        row[..., -1] = 0
        return row
    return _randn(*row.shape, seed=1000 + zlib.crc32(key.encode()) % 10000).to(row.dtype)


def variant(name, pipe_kwargs, kind):
    """New call kwargs of pipeline `name` for one prompt ("one": unchanged), two different
    prompts ("two_prompts": every prompt tensor, embeddings and masks, positive and negative,
    gets a second, different row; class_labels a second label), or two outputs per prompt
    ("two_images": num_images_per_prompt=2, or num_videos_per_prompt=2). Raises
    NotImplementedError where the pipeline cannot run the variant."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    kwargs = dict(pipe_kwargs)
    if kind == "one":
        return kwargs
    if (name, kind) in UNSUPPORTED:
        raise NotImplementedError(f"{name} {kind}: {UNSUPPORTED[name, kind]}")
    if kind == "two_prompts":
        changed = False
        for key, value in pipe_kwargs.items():
            if key == "class_labels":
                labels = list(value)
                if len(labels) != 1:
                    raise ValueError(f"{name}: expected one class label, got {labels}")
                kwargs[key] = labels + [(labels[0] + 2) % 10]
                changed = True
            elif "prompt" in key and isinstance(value, torch.Tensor):
                if value.shape[0] != 1:
                    raise ValueError(f"{name}: expected {key} of batch 1, got {tuple(value.shape)}")
                kwargs[key] = torch.cat([value, _second_row(key, value)])
                changed = True
        if not changed:
            raise NotImplementedError(f"{name} two_prompts: no prompt tensors or class labels in its kwargs")
        return kwargs
    kwargs[PER_PROMPT_ARG.get(name, "num_images_per_prompt")] = 2
    for key in REPEATED_FOR_TWO_IMAGES.get(name, ()):
        kwargs[key] = kwargs[key].repeat_interleave(2, dim=0)
    return kwargs


# ---- self-check -------------------------------------------------------------------------------


def _denoisers(pipe):
    return [m for m in (getattr(pipe, n, None) for n in ("unet", "transformer", "transformer_2")) if m is not None]


class _Probe(torch.overrides.TorchFunctionMode):
    """Counts the denoisers' calls (with their batch) and the native SDPA calls made inside them."""

    def __init__(self, pipe):
        super().__init__()
        self.pipe, self.batches, self.sdpa, self._depth, self._hooks = pipe, [], 0, 0, []

    def _pre(self, module, args, kwargs):
        if self._depth == 0:
            sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            self.batches.append(sample.shape[0])
        self._depth += 1

    def _post(self, module, args, kwargs, output):
        self._depth -= 1

    def __enter__(self):
        for m in _denoisers(self.pipe):
            self._hooks += [m.register_forward_pre_hook(self._pre, with_kwargs=True),
                            m.register_forward_hook(self._post, with_kwargs=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention and self._depth:
            self.sdpa += 1
        return func(*args, **(kwargs or {}))

    def calls(self):
        """The denoiser calls as "n x batch b" runs."""
        runs = []
        for b in self.batches:
            if runs and runs[-1][1] == b:
                runs[-1][0] += 1
            else:
                runs.append([1, b])
        return " ".join(f"{n}xB{b}" for n, b in runs)


def _check(names=None):
    import time

    failures = []
    for name in names or list(PIPELINES):
        pipe, kwargs = tiny_pipelines.build(name)
        for kind in KINDS:
            label = f"{name:18s} {kind:11s}"
            try:
                call = variant(name, kwargs, kind)
            except NotImplementedError as e:
                print(f"{label} not supported: {e}")
                continue
            try:
                tiny_pipelines.run(pipe, call, seed=0)  # warm-up
                start = time.perf_counter()
                out = tiny_pipelines.run(pipe, call, seed=0)
                seconds = time.perf_counter() - start
                with _Probe(pipe) as probe:  # the same run again, watching the denoiser
                    again = tiny_pipelines.run(pipe, call, seed=0)
            except Exception as e:  # report all, then fail
                failures.append(f"{label} {type(e).__name__}: {e}")
                print(f"{label} FAILED {type(e).__name__}: {e}")
                continue
            problems = []
            if not torch.isfinite(out).all():
                problems.append("non-finite output")
            if not torch.equal(out, again):
                problems.append("not deterministic")
            if probe.sdpa == 0:
                problems.append("no native scaled_dot_product_attention call in the denoiser")
            expected = 1 if kind == "one" else 2
            if out.shape[0] != expected:
                problems.append(f"output batch {out.shape[0]} != {expected}")
            elif expected == 2 and torch.equal(out[0], out[1]):
                problems.append("identical output rows")
            status = "ok" if not problems else "FAILED " + ", ".join(problems)
            if problems:
                failures.append(f"{label} {status}")
            print(f"{label} {seconds:6.3f}s  out {str(tuple(out.shape)):18s} denoiser {probe.calls():12s} "
                  f"sdpa {probe.sdpa:3d}  {status}")
    return failures


if __name__ == "__main__":
    import sys

    import diffusers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    failures = _check(sys.argv[1:])
    if failures:
        print("\nFAILURES:\n" + "\n".join(failures))
        sys.exit(1)
    print("\nall ok")
