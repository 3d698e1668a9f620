"""Tiny random-weight diffusers pipelines on CPU (no downloads): prompt embeddings are passed
directly where a tokenizer would be needed. Each factory returns (pipe, call kwargs)."""

import torch

import diffusers
import tiny_models
from tiny_models import _randn

PIPELINES = {}


def pipeline(name):
    def register(fn):
        PIPELINES[name] = fn
        return fn

    return register


def tiny_vae(latent_channels=4, shift_factor=None):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(shift_factor=shift_factor,
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16,
    ).eval()


def _embeds(dim=24, pooled=None):
    """Prompt and negative-prompt embeddings (5 tokens of `dim`), and pooled ones if asked."""
    embeds = dict(prompt_embeds=_randn(1, 5, dim, seed=1), negative_prompt_embeds=_randn(1, 5, dim, seed=2))
    if pooled:
        embeds.update(pooled_prompt_embeds=_randn(1, pooled, seed=3), negative_pooled_prompt_embeds=_randn(1, pooled, seed=4))
    return embeds


def _common(**extra):
    return dict(num_inference_steps=4, height=16, width=16, output_type="pt", **extra)


@pipeline("sd")
def sd():
    unet, _ = tiny_models.build("sd15-unet")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, _common(guidance_scale=5.0, **_embeds())


@pipeline("sd-img2img")
def sd_img2img():
    pipe, _ = sd()
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    image = _randn(1, 3, 16, 16, seed=3).clamp(-1, 1) * 0.5 + 0.5
    kwargs = dict(num_inference_steps=5, strength=0.6, image=image, guidance_scale=5.0, output_type="pt", **_embeds())
    return pipe, kwargs


@pipeline("sd-controlnet")
def sd_controlnet():
    pipe, _ = sd()
    torch.manual_seed(0)
    controlnet = diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 16),
    ).eval()
    pipe = diffusers.StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    image = _randn(1, 3, 16, 16, seed=4).clamp(0, 1)
    return pipe, _common(guidance_scale=5.0, image=image, **_embeds())


@pipeline("sd-ip-adapter")
def sd_ip_adapter():
    """SD with an IP-Adapter (random weights in the original checkpoint layout), image
    embeddings passed directly."""
    pipe, kwargs = sd()
    unet, clip_dim = pipe.unet, 12
    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(5)
    adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            key_id += 2
    image_proj = {
        "proj.weight": torch.randn(4 * cross, clip_dim, generator=g) * 0.1, "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross),
    }
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": adapter}], low_cpu_mem_usage=False)
    kwargs["ip_adapter_image_embeds"] = [_randn(2, 1, clip_dim, seed=6)]
    return pipe, kwargs


@pipeline("sdxl")
def sdxl():
    unet, _ = tiny_models.build("sdxl-unet")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
    )
    kwargs = _common(guidance_scale=5.0, **_embeds(24, pooled=8))
    return pipe, kwargs


@pipeline("sd3")
def sd3():
    transformer, _ = tiny_models.build("sd3")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.1),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    kwargs = _common(guidance_scale=5.0, **_embeds(16, pooled=8))
    return pipe, kwargs


@pipeline("pixart-sigma")
def pixart_sigma():
    transformer, _ = tiny_models.build("pixart")
    pipe = diffusers.PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer, scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
    )
    kwargs = _common(
        guidance_scale=5.0, **_embeds(12), prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
        use_resolution_binning=False, negative_prompt=None,
    )
    return pipe, kwargs


@pipeline("flux")
def flux():
    transformer, _ = tiny_models.build("flux")
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.1), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    kwargs = _common(guidance_scale=3.5, prompt_embeds=_randn(1, 5, 16, seed=1), pooled_prompt_embeds=_randn(1, 8, seed=2))
    return pipe, kwargs


def build(name):
    pipe, kwargs = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def run(pipe, kwargs, seed=0):
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images
