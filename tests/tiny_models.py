"""Tiny random-weight diffusers and timm models built from configs (no downloads), with a
function giving valid forward inputs for a batch size. Shared by the patching tests."""

import torch

import diffusers

FAMILIES = {}


def family(name):
    def register(fn):
        FAMILIES[name] = fn
        return fn

    return register


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


@family("sd15-unet")
def sd15_unet():
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=8, norm_num_groups=8,
    )

    def inputs(b):
        return dict(sample=_randn(b, 4, 8, 8), timestep=torch.tensor([10] * b),
                    encoder_hidden_states=_randn(b, 5, 24, seed=1))

    return model, inputs


@family("sdxl-unet")
def sdxl_unet():
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
        attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
        norm_num_groups=8,
    )

    def inputs(b):
        return dict(
            sample=_randn(b, 4, 8, 8), timestep=torch.tensor([10] * b),
            encoder_hidden_states=_randn(b, 5, 24, seed=1),
            added_cond_kwargs=dict(text_embeds=_randn(b, 8, seed=2), time_ids=_randn(b, 6, seed=3)),
        )

    return model, inputs


@family("unet2d")
def unet2d():
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    )

    def inputs(b):
        return dict(sample=_randn(b, 3, 8, 8), timestep=torch.tensor([10] * b))

    return model, inputs


@family("dit")
def dit():
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
    )

    def inputs(b):
        return dict(hidden_states=_randn(b, 4, 8, 8), timestep=torch.tensor([10] * b),
                    class_labels=torch.tensor([1] * b))

    return model, inputs


@family("pixart")
def pixart():
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12, norm_num_groups=8,
    )

    def inputs(b):
        return dict(hidden_states=_randn(b, 4, 8, 8), encoder_hidden_states=_randn(b, 5, 12, seed=1),
                    timestep=torch.tensor([10] * b),
                    added_cond_kwargs=dict(resolution=None, aspect_ratio=None))

    return model, inputs


@family("sd3")
def sd3():
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
    )

    def inputs(b):
        return dict(hidden_states=_randn(b, 4, 8, 8), encoder_hidden_states=_randn(b, 5, 16, seed=1),
                    pooled_projections=_randn(b, 8, seed=2), timestep=torch.tensor([10] * b))

    return model, inputs


@family("sd35")
def sd35():
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
    )
    _, inputs = sd3()
    return model, inputs


@family("flux")
def flux():
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )

    def inputs(b):
        n_img, n_txt = 16, 5
        img_ids = torch.zeros(n_img, 3)
        img_ids[:, 1] = torch.arange(n_img) // 4
        img_ids[:, 2] = torch.arange(n_img) % 4
        return dict(hidden_states=_randn(b, n_img, 16), encoder_hidden_states=_randn(b, n_txt, 16, seed=1),
                    pooled_projections=_randn(b, 8, seed=2), timestep=torch.tensor([0.5] * b),
                    img_ids=img_ids, txt_ids=torch.zeros(n_txt, 3))

    return model, inputs


@family("hunyuan-dit")
def hunyuan_dit():
    model = diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=16, num_layers=4, cross_attention_dim=16, cross_attention_dim_t5=16,
        pooled_projection_dim=8, text_len=5, text_len_t5=6,
    )

    def inputs(b):
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
        return dict(
            hidden_states=_randn(b, 4, 8, 8), timestep=torch.tensor([10.0] * b),
            encoder_hidden_states=_randn(b, 5, 16, seed=1), text_embedding_mask=torch.ones(b, 5),
            encoder_hidden_states_t5=_randn(b, 6, 16, seed=2), text_embedding_mask_t5=torch.ones(b, 6),
            image_meta_size=torch.tensor([[8, 8, 8, 8, 0, 0]] * b, dtype=torch.float32),
            style=torch.zeros(b, dtype=torch.long), image_rotary_emb=rope,
        )

    return model, inputs


@family("wan")
def wan():
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )

    def inputs(b):
        return dict(hidden_states=_randn(b, 4, 2, 8, 8), timestep=torch.tensor([10] * b),
                    encoder_hidden_states=_randn(b, 5, 16, seed=1))

    return model, inputs


@family("cogvideox")
def cogvideox():
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=3,
        sample_width=8, sample_height=8, sample_frames=5, patch_size=2, text_embed_dim=16,
        time_embed_dim=8, max_text_seq_length=5,
    )

    def inputs(b):
        return dict(hidden_states=_randn(b, 2, 4, 8, 8), encoder_hidden_states=_randn(b, 5, 16, seed=1),
                    timestep=torch.tensor([10] * b))

    return model, inputs


@family("ltx-video")
def ltx_video():
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16,
    )

    def inputs(b):
        return dict(hidden_states=_randn(b, 2 * 4 * 4, 8), encoder_hidden_states=_randn(b, 5, 16, seed=1),
                    timestep=torch.tensor([10] * b), encoder_attention_mask=torch.ones(b, 5),
                    num_frames=2, height=4, width=4)

    return model, inputs


@family("sana")
def sana():
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=16, sample_size=8, patch_size=2,
    )

    def inputs(b):
        return dict(hidden_states=_randn(b, 4, 8, 8), encoder_hidden_states=_randn(b, 5, 16, seed=1),
                    timestep=torch.tensor([10] * b))

    return model, inputs


def timm_dit_model(depth=4, dim=32, heads=4):
    """The demo's DiT (timm Attention blocks) with random, non-zero adaLN gates, so that
    attention reaches the output at initialisation."""
    from asag.demo.models import DigitsDiT

    model = DigitsDiT(dim=dim, depth=depth, heads=heads)
    g = torch.Generator().manual_seed(7)
    for block in model.blocks:
        block.ada[1].weight.data = torch.randn(block.ada[1].weight.shape, generator=g) * 0.05
        block.ada[1].bias.data = torch.randn(block.ada[1].bias.shape, generator=g) * 0.5
    return model


@family("timm-dit")
def timm_dit():
    model = timm_dit_model()

    def inputs(b):
        return dict(x=_randn(b, 1, 8, 8), t=torch.tensor([10] * b), y=torch.tensor([3] * b))

    return model, inputs


def build(name, seed=0):
    torch.manual_seed(seed)
    model, inputs = FAMILIES[name]()
    return model.eval(), inputs
