"""The Stable Diffusion UNet: guided-diffusion's UNet with spatial transformers (CompVis names).

Only the configuration space of SD v1/v2 text-to-image is ported; the constructor keeps CompVis's
arguments so its YAML configs load unchanged, and refuses the options this port does not support.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the timestep embedding and the text context to the layers that take them."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3x3 convolution."""

    def __init__(
        self,
        channels: int,
        use_conv: bool,
        dims: int = 2,
        out_channels: int | None = None,
        padding: int = 1,
    ):
        super().__init__()
        if not use_conv:
            raise ValueError("Downsample without convolution is not used by Stable Diffusion")
        self.op = conv_nd(dims, channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Two 3x3 convolutions with the timestep embedding added in between, and a skip."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if use_scale_shift_norm:
            raise ValueError("use_scale_shift_norm is not used by Stable Diffusion")
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        h = h + emb_out[..., None, None]  # [B, C] -> [B, C, 1, 1]
        return self.skip_connection(x) + self.out_layers(h)


def _head_layout(ch: int, num_heads: int, num_head_channels: int, legacy: bool) -> tuple[int, int]:
    """(heads, head dim) at a level with `ch` channels: v1 fixes the heads, v2 the head dim."""
    if num_head_channels == -1:
        heads, dim_head = num_heads, ch // num_heads
    else:
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // heads
    return heads, dim_head


class UNetModel(nn.Module):
    """Noise-prediction UNet of Stable Diffusion (eps or v, as the process defines).

    forward(x [B, C, H, W], timesteps [B], context [B, L, context_dim]) -> [B, out_channels, H, W].
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions,
        dropout: float = 0.0,
        channel_mult=(1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions=None,
        num_attention_blocks=None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
    ):
        super().__init__()
        # image_size is unused by the network (CompVis marks it so in its configs). use_fp16 is
        # accepted so Stability's v2 configs load: precision comes from autocast, not the config.
        unsupported = {
            "num_classes": num_classes is not None,
            "n_embed": n_embed is not None,
            "resblock_updown": resblock_updown,
            "use_new_attention_order": use_new_attention_order,
            "use_spatial_transformer=False": not use_spatial_transformer,
            "num_attention_blocks": num_attention_blocks is not None,
            "context_dim=None": context_dim is None,
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"UNetModel options not supported (SD text-to-image only): {bad}")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel needs num_heads or num_head_channels")
        if hasattr(context_dim, "__len__"):  # a ListConfig of one entry in some configs
            context_dim = context_dim[0]
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.use_checkpoint = use_checkpoint
        disable_self_attentions = disable_self_attentions or [False] * len(channel_mult)

        def transformer(ch: int, heads_setting: int, disable: bool) -> nn.Module:
            heads, dim_head = _head_layout(ch, heads_setting, num_head_channels, legacy)
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=transformer_depth,
                context_dim=context_dim,
                disable_self_attn=disable,
                use_linear=use_linear_in_transformer,
                use_checkpoint=use_checkpoint,
            )

        def resblock(ch_in: int, ch_out: int) -> nn.Module:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, num_heads, disable_self_attentions[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                )
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch),
            transformer(ch, num_heads, disable_middle_self_attn),
            resblock(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    # num_heads, not num_heads_upsample: CompVis passes the latter only to
                    # the (unported) AttentionBlock, never to a SpatialTransformer.
                    layers.append(transformer(ch, num_heads, disable_self_attentions[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    def checkpointed_blocks(self) -> list[nn.Module]:
        """The blocks gradient checkpointing recomputes: every ResBlock and transformer block."""
        return [m for m in self.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the checkpointed blocks in the backward pass."""
        self.use_checkpoint = enabled
        for module in self.checkpointed_blocks():
            if isinstance(module, ResBlock):
                module.use_checkpoint = enabled
            else:
                module.checkpoint = enabled

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # skip connection along channels
            h = module(h, emb, context)
        return self.out(h)
