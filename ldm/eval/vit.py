"""DINO ViT-S/16 (Caron et al. 2021) for the DreamBooth DINO and PRES metrics.

A port of facebookresearch/dino `vision_transformer.py` reduced to inference: the backbone returns
the CLS token after the final LayerNorm. Parameter names equal those of the official checkpoint
`dino_deitsmall16_pretrain.pth` (a plain state dict), which therefore loads strictly.
"""

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

from ldm.eval.weights import DINO_VITS16_URL, load_state_dict_file, load_strict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3C] -> [3, B, heads, N, C/heads]
        qkv = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        # SDPA's default scale head_dim**-0.5 is DINO's qk_scale.
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, H/p * W/p, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT backbone without a classifier head (`num_classes=0`).

    The defaults are ViT-S/16 as built by DINO's `vit_small`: 21,665,664 parameters.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Position embeddings for tokens `x` [B, 1 + h/p * w/p, D] of an h x w image, as DINO does."""
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        side = math.sqrt(n)
        # The 0.1 keeps floor(side * scale) from landing one below the grid size
        # (facebookresearch/dino issue 8); using scale_factor keeps DINO's exact sampling grid.
        h0 = h // self.patch_embed.patch_size + 0.1
        w0 = w // self.patch_embed.patch_size + 0.1
        # [1, N, D] -> [1, D, sqrt(N), sqrt(N)]
        grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
        if grid.shape[-2:] != (int(h0), int(w0)):
            raise RuntimeError(f"position grid {tuple(grid.shape[-2:])} for a {h}x{w} image")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, x.shape[-1])
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (ImageNet-normalized) -> CLS embeddings after the final norm [B, D]."""
        h, w = x.shape[-2:]
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def vit_small(patch_size: int = 16) -> VisionTransformer:
    """DINO's `vit_small`: embed 384, depth 12, 6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6."""
    return VisionTransformer(patch_size=patch_size)


def dino_transform() -> transforms.Compose:
    """DINO's evaluation preprocessing: resize 256 (bicubic), center crop 224, ImageNet mean/std."""
    return transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def load_dino(path: str | Path, device: str | torch.device = "cpu") -> VisionTransformer:
    """DINO ViT-S/16 with the official weights `dino_deitsmall16_pretrain.pth`."""
    state_dict = load_state_dict_file(path, DINO_VITS16_URL)
    model = vit_small()
    load_strict(model, state_dict, path)
    return model.to(device)
