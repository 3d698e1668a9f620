"""Still more tiny random-weight diffusers pipelines on CPU (no downloads, prompt embeddings
passed directly, 2 inference steps, seeded), registered into ``tiny_pipelines.PIPELINES`` on
import like those of ``tiny_pipelines_more``. ``EXTRA`` lists the names registered here;
:func:`build` returns (pipe, call kwargs) for one prompt ("one") or two ("two_prompts").

Pipelines whose transformer is built from a family in ``tiny_models_more`` reuse its config.
``python tiny_pipelines_extra.py [names]`` builds and runs them (finite, seed-deterministic
outputs); tests/test_pipelines.py checks asag.enable on them.
"""

import torch

import diffusers
import tiny_models
import tiny_models_more  # noqa: F401  (registers its families into tiny_models.FAMILIES)
import tiny_pipelines
import tiny_pipelines_more
from tiny_models import _randn
from tiny_pipelines import pipeline, tiny_vae
from tiny_pipelines_more import STEPS, _steps

_BEFORE = set(tiny_pipelines.PIPELINES)

# Arguments other than "*prompt*" tensors that carry one row per prompt (for "two_prompts").
PER_PROMPT_TENSORS = {
    "kandinsky22": ("image_embeds", "negative_image_embeds"),
    "stable-audio": ("attention_mask", "negative_attention_mask"),
    "stable-audio-no-negative": ("attention_mask",),
}
# Prompt tensors whose batch is their dim 1.
BATCH_DIM_1 = {n: ("prompt_embeds_llama3", "negative_prompt_embeds_llama3")
               for n in ("hidream", "hidream-2-llama-layers")}


# ---- UNet pipelines ---------------------------------------------------------------------------


def _unet(**extra):
    """The sd15-unet family's config, with changes."""
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    )
    config.update(extra)
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**config).eval()


@pipeline("sd-instruct-pix2pix")
def sd_instruct_pix2pix():
    # The UNet takes the noisy latents and the image latents (4 + 4 channels). CFG is one call on
    # [text+image, image only, neither]: prompt embeddings [c, u, u], image latents [i, i, 0].
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=_unet(in_channels=8),
        scheduler=diffusers.EulerAncestralDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    image = _randn(1, 3, 16, 16, seed=3).clamp(-1, 1) * 0.5 + 0.5
    kwargs = dict(image=image, num_inference_steps=STEPS, guidance_scale=5.0, image_guidance_scale=1.5,
                  output_type="pt", prompt_embeds=_randn(1, 5, 24, seed=1),
                  negative_prompt_embeds=_randn(1, 5, 24, seed=2))
    return pipe, kwargs


@pipeline("lcm")
def lcm():
    # Guidance-distilled: the CFG scale is embedded (timestep_cond, time_cond_proj_dim), one
    # call per step on the conditional rows only; the pipeline takes no negative prompt.
    pipe = diffusers.LatentConsistencyModelPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=_unet(time_cond_proj_dim=16),
        scheduler=diffusers.LCMScheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    return pipe, _steps(guidance_scale=8.0, prompt_embeds=_randn(1, 5, 24, seed=1))


@pipeline("sdxl-refiner")
def sdxl_refiner():
    # SDXL img2img as the refiner: aesthetic-score conditioning (5 time ids: original size, crop,
    # score; negative_aesthetic_score for the unconditional row), so the add embedding takes
    # 5 * 4 + 8 (pooled) = 28 inputs.
    unet, _ = tiny_models.build("sdxl-unet")
    config = dict(unet.config)
    config["projection_class_embeddings_input_dim"] = 28
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(config).eval()
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    image = _randn(1, 3, 16, 16, seed=3).clamp(-1, 1) * 0.5 + 0.5
    # 4 scheduled steps at strength 0.5: 2 denoising steps.
    kwargs = dict(num_inference_steps=4, strength=0.5, image=image, guidance_scale=5.0, output_type="pt",
                  aesthetic_score=6.0, negative_aesthetic_score=2.5, **tiny_pipelines._embeds(24, pooled=8))
    return pipe, kwargs


@pipeline("kandinsky22")
def kandinsky22():
    # The decoder: no text; the UNet is conditioned on image embeddings (added_cond_kwargs
    # image_embeds) and predicts 8 channels (eps and learned variance); CFG is one call on
    # [negative_image_embeds, image_embeds]. MoVQ latents have a factor of 2 here; the pipeline
    # divides height and width by factor ** 2 and multiplies back by factor.
    unet = _unet(
        in_channels=4, out_channels=8, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        encoder_hid_dim=12, encoder_hid_dim_type="image_proj", addition_embed_type="image", class_embed_type=None,
        only_cross_attention=False, resnet_time_scale_shift="scale_shift", cross_attention_dim=24,
    )
    torch.manual_seed(0)
    movq = diffusers.VQModel(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
        num_vq_embeddings=12, out_channels=3, up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        vq_embed_dim=4,
    ).eval()
    scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False,
                                        beta_schedule="linear", prediction_type="epsilon", thresholding=False)
    pipe = diffusers.KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    # 32x32 -> latents 8x8 (32 // 2**2) -> image 16x16.
    kwargs = dict(height=32, width=32, num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
                  image_embeds=_randn(1, 12, seed=1), negative_image_embeds=_randn(1, 12, seed=2))
    return pipe, kwargs


# ---- Flux family ------------------------------------------------------------------------------


def _flux_components():
    pipe, kwargs = tiny_pipelines.flux()
    return pipe.components, kwargs


@pipeline("flux-img2img")
def flux_img2img():
    components, kwargs = _flux_components()
    pipe = diffusers.FluxImg2ImgPipeline(**components)
    image = _randn(1, 3, 16, 16, seed=3).clamp(-1, 1) * 0.5 + 0.5
    # 4 scheduled steps at strength 0.5: 2 denoising steps.
    kwargs.update(image=image, strength=0.5, num_inference_steps=4)
    return pipe, kwargs


@pipeline("flux-kontext")
def flux_kontext():
    # The context image's latents are appended to the image tokens (16 noisy + 16 context), and
    # the prediction cut back to the first 16. No resizing to Kontext's preferred resolutions.
    components, kwargs = _flux_components()
    pipe = diffusers.FluxKontextPipeline(**components)
    image = _randn(1, 3, 16, 16, seed=3).clamp(-1, 1) * 0.5 + 0.5
    kwargs.update(image=image, num_inference_steps=STEPS, max_area=16 * 16, _auto_resize=False)
    return pipe, kwargs


@pipeline("flux-kontext-true-cfg")
def flux_kontext_true_cfg():
    pipe, kwargs = flux_kontext()
    kwargs.update(true_cfg_scale=4.0, negative_prompt_embeds=_randn(1, 5, 16, seed=3),
                  negative_pooled_prompt_embeds=_randn(1, 8, seed=4))
    return pipe, kwargs


@pipeline("chroma")
def chroma():
    # Flux-like without pooled text; CFG as two calls (conditional, then negative), boolean
    # text masks extended by the pipeline over the image tokens.
    torch.manual_seed(0)
    transformer = diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=12,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 4, 4), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1,
    ).eval()
    pipe = diffusers.ChromaPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae(shift_factor=0.1),
                                    text_encoder=None, tokenizer=None, transformer=transformer)
    kwargs = _steps(guidance_scale=4.0, prompt_embeds=_randn(1, 5, 16, seed=1),
                    negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                    prompt_attention_mask=torch.ones(1, 5, dtype=torch.bool),
                    negative_prompt_attention_mask=torch.ones(1, 5, dtype=torch.bool))
    return pipe, kwargs


# ---- other image DiTs --------------------------------------------------------------------------


@pipeline("auraflow")
def auraflow():
    # One CFG call on [negative, prompt]; 8 learned register tokens are prepended to the text.
    transformer, _ = tiny_models.build("auraflow")
    pipe = diffusers.AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer.eval(),
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    kwargs = _steps(guidance_scale=4.0, prompt_embeds=_randn(1, 5, 16, seed=1),
                    negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                    prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5))
    return pipe, kwargs


@pipeline("cogview4")
def cogview4():
    # CFG as two calls per step (conditional, then negative); size conditioning from the image size.
    transformer, _ = tiny_models.build("cogview4")
    pipe = diffusers.CogView4Pipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer.eval(),
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    kwargs = _steps(guidance_scale=4.0, prompt_embeds=_randn(1, 6, 16, seed=1),
                    negative_prompt_embeds=_randn(1, 6, 16, seed=2))
    return pipe, kwargs


# ---- video pipelines ---------------------------------------------------------------------------


def _alias_frames_as_images():
    """As tiny_pipelines_more: a read-only `images` alias of the video outputs' `frames`."""
    from diffusers.pipelines.hunyuan_video.pipeline_output import HunyuanVideoPipelineOutput
    from diffusers.pipelines.mochi.pipeline_output import MochiPipelineOutput
    from diffusers.pipelines.skyreels_v2.pipeline_output import SkyReelsV2PipelineOutput
    from diffusers.pipelines.allegro.pipeline_output import AllegroPipelineOutput
    from diffusers.pipelines.easyanimate.pipeline_output import EasyAnimatePipelineOutput
    from diffusers.pipelines.latte.pipeline_latte import LattePipelineOutput

    for cls in (HunyuanVideoPipelineOutput, MochiPipelineOutput, SkyReelsV2PipelineOutput, AllegroPipelineOutput,
                EasyAnimatePipelineOutput, LattePipelineOutput):
        if not hasattr(cls, "images"):
            cls.images = property(lambda self: self.frames)


_alias_frames_as_images()


def _wan_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.0, 1.5, 0.8, 1.2],
    ).eval()


@pipeline("hunyuan-video")
def hunyuan_video():
    # Embedded guidance (guidance_scale) plus true CFG (true_cfg_scale with negative embeddings):
    # two calls per step. The text goes through the token refiner (text-only attention) first.
    torch.manual_seed(0)
    transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
    ).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True,
    ).eval()
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=None, tokenizer_2=None)
    # 64x64, 5 frames -> latents (4, 2, 8, 8) -> 2 * 16 = 32 tokens; text 7 tokens.
    kwargs = dict(height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=6.0,
                  true_cfg_scale=4.0, output_type="pt",
                  prompt_embeds=_randn(1, 7, 16, seed=1), negative_prompt_embeds=_randn(1, 7, 16, seed=2),
                  pooled_prompt_embeds=_randn(1, 8, seed=3), negative_pooled_prompt_embeds=_randn(1, 8, seed=4),
                  prompt_attention_mask=torch.ones(1, 7), negative_prompt_attention_mask=torch.ones(1, 7))
    return pipe, kwargs


@pipeline("hunyuan-video-no-cfg")
def hunyuan_video_no_cfg():
    # HunyuanVideo as usually run: embedded guidance only (no negative prompt, no true CFG), one
    # call per step on the conditional rows.
    pipe, kwargs = hunyuan_video()
    for key in ("true_cfg_scale", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                "negative_prompt_attention_mask"):
        kwargs.pop(key)
    return pipe, kwargs


@pipeline("mochi")
def mochi():
    # One CFG call on [negative, prompt]; the attention runs SDPA per sample (dropping masked
    # text tokens). The pipeline hard-codes 12 latent channels and factors 8 (space), 6 (time).
    torch.manual_seed(0)
    transformer = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=12, num_layers=2, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=32, time_embed_dim=16,
    ).eval()
    tiny_models_more._randomize(transformer, ("pos_frequencies",), scale=0.3)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    pipe = diffusers.MochiPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                   tokenizer=None, transformer=transformer)
    # 64x64, 7 frames -> latents (12, 2, 8, 8) -> 32 tokens; text 6 tokens.
    kwargs = dict(height=64, width=64, num_frames=7, num_inference_steps=STEPS, guidance_scale=4.5, output_type="pt",
                  prompt_embeds=_randn(1, 6, 32, seed=1), negative_prompt_embeds=_randn(1, 6, 32, seed=2),
                  prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))
    return pipe, kwargs


@pipeline("skyreels-v2")
def skyreels_v2():
    # Wan-like: CFG as two calls per step.
    torch.manual_seed(0)
    transformer = diffusers.SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=8.0)
    pipe = diffusers.SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=_wan_vae(),
                                        scheduler=scheduler)
    kwargs = dict(height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                  prompt_embeds=_randn(1, 7, 16, seed=1), negative_prompt_embeds=_randn(1, 7, 16, seed=2))
    return pipe, kwargs


def _wan_transformer(**extra):
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32)
    config.update(extra)
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**config).eval()


def _wan_i2v_kwargs(**extra):
    image = _randn(1, 3, 64, 64, seed=5).clamp(-1, 1) * 0.5 + 0.5
    return dict(image=image, height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0,
                output_type="pt", prompt_embeds=_randn(1, 7, 16, seed=1),
                negative_prompt_embeds=_randn(1, 7, 16, seed=2),
                **extra)


def _tiny_clip_vision():
    """A tiny random CLIP vision encoder (transformers, from a config) and its processor: 32x32
    input, 16x16 patches -> 4 patch tokens and a class token of width 12."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=12)
    encoder = transformers.CLIPVisionModel(config).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return encoder, processor


@pipeline("wan-i2v")
def wan_i2v():
    # Wan 2.1 image-to-video: the latents get the image condition (4 mask + 4 latent channels)
    # concatenated in channels; CLIP image embeddings (a tiny random CLIP vision encoder: the
    # pipeline refuses image_embeds together with the image it needs for the condition) go to
    # both CFG calls as encoder_hidden_states_image.
    import PIL.Image

    encoder, processor = _tiny_clip_vision()
    transformer = _wan_transformer(in_channels=12, image_dim=12, added_kv_proj_dim=16)
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=_wan_vae(),
                                             scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                             image_processor=processor, image_encoder=encoder, transformer=transformer)
    kwargs = _wan_i2v_kwargs()
    pixels = (kwargs["image"][0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    kwargs["image"] = PIL.Image.fromarray(pixels)
    return pipe, kwargs


@pipeline("wan22-i2v")
def wan22_i2v():
    # Wan 2.2 image-to-video with two experts: transformer (high noise) before the boundary,
    # transformer_2 (low noise, its own guidance_scale_2) after; no image embeddings.
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=_wan_vae(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=None, image_encoder=None, transformer=_wan_transformer(in_channels=12),
        transformer_2=_wan_transformer(in_channels=12, num_layers=2), boundary_ratio=0.9,
    )
    return pipe, _wan_i2v_kwargs(guidance_scale_2=3.0)


@pipeline("wan22-ti2v")
def wan22_ti2v():
    # Wan 2.2 TI2V-style: expand_timesteps, the first latent frame is the image's and the
    # timestep is per token, (batch, tokens), 0 on the first frame's tokens.
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=_wan_vae(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=None, image_encoder=None, transformer=_wan_transformer(), expand_timesteps=True,
    )
    return pipe, _wan_i2v_kwargs()


@pipeline("latte")
def latte():
    # One CFG call on [negative, prompt]; each block has spatial attention (over each frame's
    # tokens, batch * frames sequences) and temporal attention (over the frames, batch * tokens
    # sequences). Learned sigma: 8 output channels, the pipeline keeps the first 4.
    torch.manual_seed(0)
    transformer = diffusers.LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=3,
    ).eval()
    pipe = diffusers.LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                                   scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1))
    # 16x16, 3 frames -> latents (4, 3, 8, 8): 16 tokens per frame; text 5 tokens of 32.
    kwargs = dict(height=16, width=16, video_length=3, num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                  prompt_embeds=_randn(1, 5, 32, seed=1), negative_prompt_embeds=_randn(1, 5, 32, seed=2),
                  negative_prompt=None, mask_feature=False)
    return pipe, kwargs


@pipeline("allegro")
def allegro():
    # One CFG call on [negative, prompt]. The Allegro VAE decodes only in 24-frame 320px tiles,
    # so the output is the latents (output_type="latent"); the VAE gives the scale factors.
    torch.manual_seed(0)
    transformer = diffusers.AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, num_layers=2, cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=2,
        caption_channels=16,
    ).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLAllegro(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    pipe = diffusers.AllegroPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=diffusers.KDPM2AncestralDiscreteScheduler())
    # 64x64, 5 frames -> latents (4, 2, 8, 8) -> 32 tokens; text 6 tokens.
    kwargs = dict(height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0,
                  output_type="latent", negative_prompt=None, prompt_embeds=_randn(1, 6, 16, seed=1),
                  negative_prompt_embeds=_randn(1, 6, 16, seed=2),
                  prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))
    return pipe, kwargs


@pipeline("easyanimate")
def easyanimate():
    # One CFG call on [negative, prompt], denoiser called with positional (latents, t).
    torch.manual_seed(0)
    transformer = diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
        sample_width=8, sample_height=8, time_embed_dim=16, text_embed_dim=16, num_layers=2, mmdit_layers=2,
    ).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLMagvit(
        in_channels=3, latent_channels=4, out_channels=3, block_out_channels=[8, 8, 8, 8],
        down_block_types=["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3,
        up_block_types=["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3,
        layers_per_block=1, norm_num_groups=8, spatial_group_norm=False,
    ).eval()
    pipe = diffusers.EasyAnimatePipeline(vae=vae, text_encoder=None, tokenizer=None, transformer=transformer,
                                         scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    # 64x64, 5 frames -> latents (4, 2, 8, 8) -> 32 tokens; text 6 tokens.
    kwargs = dict(height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0, output_type="pt",
                  prompt_embeds=_randn(1, 6, 16, seed=1), negative_prompt_embeds=_randn(1, 6, 16, seed=2),
                  prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long))
    return pipe, kwargs


# ---- Sana (linear attention: asag must refuse) -------------------------------------------------


@pipeline("sana")
def sana():
    transformer, _ = tiny_models.build("sana")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer.eval(),
                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    # Sizes divisible by 32: 64x64 -> latents 32x32 (factor 2) -> 256 tokens.
    kwargs = _steps(guidance_scale=4.5, prompt_embeds=_randn(1, 5, 16, seed=1),
                    negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                    prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
                    use_resolution_binning=False, negative_prompt=None)
    kwargs.update(height=64, width=64)
    return pipe, kwargs


# ---- Stable Audio ------------------------------------------------------------------------------


def _alias_audios_as_images():
    from diffusers.pipelines.pipeline_utils import AudioPipelineOutput

    if not hasattr(AudioPipelineOutput, "images"):
        AudioPipelineOutput.images = property(lambda self: self.audios)


_alias_audios_as_images()


@pipeline("stable-audio")
def stable_audio():
    # The text (projected by the projection model) is concatenated with the start/end-second
    # embeddings into the cross-attention context; the seconds also form the global token.
    # One CFG call on [negative, prompt]. 12 latent steps of 4 channels; the Oobleck VAE
    # upsamples x2 to 24 samples of stereo audio at 4 Hz (6 s at most).
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    torch.manual_seed(0)
    transformer = diffusers.StableAudioDiTModel(
        sample_size=12, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=16,
        global_states_input_dim=24, cross_attention_input_dim=12,
    ).eval()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderOobleck(encoder_hidden_size=6, downsampling_ratios=[1, 2], decoder_channels=3,
                                       decoder_input_channels=4, audio_channels=2, channel_multiples=[2, 4],
                                       sampling_rate=4).eval()
    torch.manual_seed(0)
    projection = StableAudioProjectionModel(text_encoder_dim=16, conditioning_dim=12, min_value=0, max_value=32).eval()
    pipe = diffusers.StableAudioPipeline(vae=vae, text_encoder=None, projection_model=projection, tokenizer=None,
                                         transformer=transformer,
                                         # the pipeline's usual CosineDPMSolverMultistepScheduler needs torchsde
                                         scheduler=diffusers.EDMDPMSolverMultistepScheduler())
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.0, audio_end_in_s=5.0, output_type="pt",
                  prompt_embeds=_randn(1, 5, 16, seed=1), negative_prompt_embeds=_randn(1, 5, 16, seed=2),
                  attention_mask=torch.ones(1, 5, dtype=torch.long),
                  negative_attention_mask=torch.ones(1, 5, dtype=torch.long))
    return pipe, kwargs


@pipeline("stable-audio-no-negative")
def stable_audio_no_negative():
    # CFG without a negative prompt: the pipeline makes the unconditional context zeros.
    pipe, kwargs = stable_audio()
    for key in ("negative_prompt_embeds", "negative_attention_mask"):
        kwargs.pop(key)
    return pipe, kwargs


# ---- HiDream ------------------------------------------------------------------------------------


def _hidream(llama_layers, n_llama):
    # The Llama embeddings are ONE tensor (layers, batch, tokens, dim) and the pipeline's CFG
    # concatenates them along dim 1 (the batch), not dim 0. One CFG call on [negative, prompt].
    # The pipeline rescales height and width to an area of (default_sample_size * 2)^2 pixels:
    # set to 8 here (16x16 images, 8x8 latents, 16 tokens).
    torch.manual_seed(0)
    transformer = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=12,
        num_attention_heads=2, caption_channels=[16, 20], text_emb_dim=8, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 4, 4), max_resolution=(8, 8), llama_layers=llama_layers,
    ).eval()
    pipe = diffusers.HiDreamImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(shift_factor=0.1),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None, text_encoder_4=None, tokenizer_4=None, transformer=transformer,
    )
    pipe.default_sample_size = 8
    kwargs = _steps(guidance_scale=5.0, prompt_embeds_t5=_randn(1, 5, 16, seed=1),
                    negative_prompt_embeds_t5=_randn(1, 5, 16, seed=2),
                    prompt_embeds_llama3=_randn(n_llama, 1, 7, 20, seed=3),
                    negative_prompt_embeds_llama3=_randn(n_llama, 1, 7, 20, seed=4),
                    pooled_prompt_embeds=_randn(1, 8, seed=5), negative_pooled_prompt_embeds=_randn(1, 8, seed=6))
    return pipe, kwargs


@pipeline("hidream")
def hidream():
    return _hidream([0, 1, 2], 3)  # 3 Llama layers: not a multiple of the CFG batch of 2


@pipeline("hidream-2-llama-layers")
def hidream_2_llama_layers():
    return _hidream([0, 1, 1], 2)  # 2 Llama layers: as many as the CFG batch


# ---- what asag.enable does on them (202e09a) --------------------------------------------------
# "ok": lam = 0 reproduces the plain pipeline (batched and sequential, 1 and 2 prompts), scale 0 is
# bit-identical, lam = 3 changes the output, one adversarial row per conditional sample, and the
# scheduler gets u + w (c - u) + s (c - c_adv). Anything else: what happens instead.



# ---- variants ----------------------------------------------------------------------------------

EXTRA = [n for n in tiny_pipelines.PIPELINES if n not in _BEFORE]


def variant(name, kwargs, kind):
    """One prompt ("one") or two ("two_prompts"): every prompt tensor (and the pipeline's other
    per-prompt tensors) gets a second, different row. HiDream's Llama embeddings
    (layers, batch, tokens, dim) get theirs along dim 1."""
    kwargs = dict(kwargs)
    if kind == "one":
        return kwargs
    if kind != "two_prompts":
        raise NotImplementedError(f"{name} {kind}: only 'one' and 'two_prompts' are set up here")
    for key in PER_PROMPT_TENSORS.get(name, ()):
        kwargs[key] = torch.cat([kwargs[key], tiny_pipelines_more._second_row(key, kwargs[key])])
    along_1 = {k: kwargs.pop(k) for k in BATCH_DIM_1.get(name, ())}
    if any("prompt" in k and isinstance(v, torch.Tensor) for k, v in kwargs.items()):
        kwargs = tiny_pipelines_more.variant(name, kwargs, kind)
    for key, value in along_1.items():
        second = tiny_pipelines_more._second_row(key, value.transpose(0, 1)).transpose(0, 1)
        kwargs[key] = torch.cat([value, second], dim=1)
    return kwargs


def build(name, kind="one"):
    pipe, kwargs = tiny_pipelines.build(name)
    return pipe, variant(name, kwargs, kind)


if __name__ == "__main__":
    import sys

    import diffusers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    failures = []
    for name in sys.argv[1:] or EXTRA:
        for kind in ("one", "two_prompts"):
            pipe, kwargs = build(name, kind)
            out = tiny_pipelines.run(pipe, kwargs)
            ok = bool(torch.isfinite(out).all()) and torch.equal(out, tiny_pipelines.run(pipe, kwargs))
            ok = ok and out.shape[0] == (1 if kind == "one" else 2)
            print(f"{name:26s} {kind:11s} out {str(tuple(out.shape)):20s} {'ok' if ok else 'FAILED'}")
            if not ok:
                failures.append((name, kind))
    sys.exit(1 if failures else 0)
