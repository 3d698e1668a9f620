"""The demo's models: a class-conditional DiT built from timm's Attention (as the original DiT
code), an unconditional diffusers UNet2DModel with attention blocks, and the small classifier
whose features the metrics use."""

import math
import os

import torch
from torch import nn

CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block: timm Attention + Mlp."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        from timm.layers import Attention, Mlp

        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=4 * dim, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DigitsDiT(nn.Module):
    """Class-conditional DiT on 8x8x1 images, 2x2 patches (16 tokens). Label ``num_classes``
    is the null label of classifier-free guidance."""

    def __init__(self, dim=96, depth=6, heads=4, num_classes=10, size=8, patch=2, channels=1):
        super().__init__()
        self.size, self.patch, self.channels, self.num_classes = size, patch, channels, num_classes
        tokens = (size // patch) ** 2
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * channels)
        self.dim = dim

    def forward(self, x, t, y):
        b, g = x.shape[0], self.size // self.patch
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        t = t.expand(b) if t.dim() == 0 or t.shape[0] == 1 else t
        c = self.t_mlp(timestep_embedding(t, self.dim)) + self.y_embed(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.out(self.norm(h) * (1 + scale) + shift)
        h = h.view(b, g, g, self.channels, self.patch, self.patch).permute(0, 3, 1, 4, 2, 5)
        return h.reshape(b, self.channels, self.size, self.size)


def make_unet():
    """Unconditional diffusers UNet2DModel with attention at the 4x4 level and mid-block."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, norm_num_groups=8,
    )


class DigitClassifier(nn.Module):
    """Small CNN; ``features`` (64-d, before the last layer) serve FID, precision and recall."""

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, 64), nn.SiLU(),
        )
        self.head = nn.Linear(64, classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def load(name: str, map_location="cpu"):
    """A shipped checkpoint ("dit", "unet" or "classifier"): (model in eval mode, metadata)."""
    path = os.path.join(CHECKPOINTS, f"{name}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint {path}; train it with python benchmarks/quality/train.py")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = {"dit": lambda: DigitsDiT(**blob["meta"].get("arch", {})), "unet": make_unet, "classifier": DigitClassifier}[name]()
    model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    return model.eval(), blob["meta"]
