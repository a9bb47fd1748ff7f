"""The one name table between the Stable Diffusion checkpoint layout (CompVis module names) and
diffusers' (UNet2DConditionModel, AutoencoderKL, transformers' CLIPTextModel).

Every conversion is derived from it, in both directions: diffusers folders in and out, and the
module names of kohya/webui LoRA files (kohya names SD v1/v2 modules by their diffusers path).
The facts are those of diffusers' convert_original_stable_diffusion_to_diffusers /
single_file_utils and convert_diffusers_to_original_stable_diffusion.

A rule pairs an SD path with a diffusers path (a module prefix, or a whole key). A key maps by
the longest rule that is a dot-prefix of it, keeping the rest (`.weight`, or the path inside an
attention block, whose names are the same on both sides). Two rules change values as well as
names: `conv1x1` (the VAE's attention stores 1x1 convolutions [C, C, 1, 1] where diffusers stores
linear weights [C, C]) and `rows` (OpenCLIP's fused `in_proj` is diffusers' q, k and v
projections stacked along the rows).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

UNET, VAE, TEXT = "unet", "vae", "text_encoder"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

# Inside a UNet ResBlock: CompVis name -> diffusers ResnetBlock2D name.
_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_VAE_RESNET = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
)
_OPENCLIP_BLOCK = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)


@dataclass(frozen=True)
class Structure:
    """What the table depends on: the number of levels and blocks of the UNet and the VAE, which
    UNet levels have attention, and the text encoder's family and diffusers layer count."""

    unet_attention: tuple[bool, ...]  # per level
    unet_layers: int  # ResBlocks per level on the way down (num_res_blocks / layers_per_block)
    vae_levels: int
    vae_layers: int
    text: str  # "clip" (SD v1) or "openclip" (SD v2)
    text_layers: int  # layers diffusers stores (SD v2's penultimate layer: all but the last)


@dataclass(frozen=True)
class Rule:
    sd: str
    component: str
    diffusers: tuple[str, ...]  # one path; three for `rows`
    kind: str = "same"  # same | conv1x1 | rows


@dataclass(frozen=True)
class Target:
    """Where one tensor lives on the other side: `part` i of `parts` row blocks for `rows`."""

    key: str
    component: str
    kind: str = "same"
    part: int = 0
    parts: int = 1


def _pairs(sd: str, component: str, d: str, inner=()) -> Iterator[Rule]:
    if inner:
        yield from (Rule(f"{sd}.{a}", component, (f"{d}.{b}",)) for a, b in inner)
    else:
        yield Rule(sd, component, (d,))


def _unet_rules(s: Structure) -> Iterator[Rule]:
    p, n, per = UNET_PREFIX, len(s.unet_attention), s.unet_layers
    yield from _pairs(f"{p}time_embed.0", UNET, "time_embedding.linear_1")
    yield from _pairs(f"{p}time_embed.2", UNET, "time_embedding.linear_2")
    yield from _pairs(f"{p}input_blocks.0.0", UNET, "conv_in")
    for b, attention in enumerate(s.unet_attention):
        for j in range(per):
            i = 1 + b * (per + 1) + j
            d = f"down_blocks.{b}"
            yield from _pairs(f"{p}input_blocks.{i}.0", UNET, f"{d}.resnets.{j}", _UNET_RESNET)
            if attention:
                yield from _pairs(f"{p}input_blocks.{i}.1", UNET, f"{d}.attentions.{j}")
        if b < n - 1:
            i = 1 + b * (per + 1) + per
            yield from _pairs(
                f"{p}input_blocks.{i}.0.op", UNET, f"down_blocks.{b}.downsamplers.0.conv"
            )
    yield from _pairs(f"{p}middle_block.0", UNET, "mid_block.resnets.0", _UNET_RESNET)
    yield from _pairs(f"{p}middle_block.1", UNET, "mid_block.attentions.0")
    yield from _pairs(f"{p}middle_block.2", UNET, "mid_block.resnets.1", _UNET_RESNET)
    for u in range(n):  # up block u works at level n - 1 - u
        attention = s.unet_attention[n - 1 - u]
        for j in range(per + 1):
            i = u * (per + 1) + j
            d = f"up_blocks.{u}"
            yield from _pairs(f"{p}output_blocks.{i}.0", UNET, f"{d}.resnets.{j}", _UNET_RESNET)
            if attention:
                yield from _pairs(f"{p}output_blocks.{i}.1", UNET, f"{d}.attentions.{j}")
            if u < n - 1 and j == per:
                up = f"{p}output_blocks.{i}.{2 if attention else 1}.conv"
                yield from _pairs(up, UNET, f"{d}.upsamplers.0.conv")
    yield from _pairs(f"{p}out.0", UNET, "conv_norm_out")
    yield from _pairs(f"{p}out.2", UNET, "conv_out")


def _vae_rules(s: Structure) -> Iterator[Rule]:
    p, n = VAE_PREFIX, s.vae_levels
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out"):
        yield from _pairs(f"{p}{name}", VAE, name)
    for name in ("quant_conv", "post_quant_conv"):
        yield from _pairs(f"{p}{name}", VAE, name)
    for part in ("encoder", "decoder"):
        yield from _pairs(f"{p}{part}.norm_out", VAE, f"{part}.conv_norm_out")
        for k in (1, 2):
            yield from _pairs(
                f"{p}{part}.mid.block_{k}", VAE, f"{part}.mid_block.resnets.{k - 1}", _VAE_RESNET
            )
        attn, d = f"{p}{part}.mid.attn_1", f"{part}.mid_block.attentions.0"
        yield from _pairs(f"{attn}.norm", VAE, f"{d}.group_norm")
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            yield Rule(f"{attn}.{a}", VAE, (f"{d}.{b}",), "conv1x1")
    for b in range(n):
        down = f"{p}encoder.down.{b}"
        for j in range(s.vae_layers):
            yield from _pairs(
                f"{down}.block.{j}", VAE, f"encoder.down_blocks.{b}.resnets.{j}", _VAE_RESNET
            )
        if b < n - 1:
            yield from _pairs(
                f"{down}.downsample.conv", VAE, f"encoder.down_blocks.{b}.downsamplers.0.conv"
            )
        up, d = f"{p}decoder.up.{b}", f"decoder.up_blocks.{n - 1 - b}"
        for j in range(s.vae_layers + 1):
            yield from _pairs(f"{up}.block.{j}", VAE, f"{d}.resnets.{j}", _VAE_RESNET)
        if b > 0:
            yield from _pairs(f"{up}.upsample.conv", VAE, f"{d}.upsamplers.0.conv")


def _text_rules(s: Structure) -> Iterator[Rule]:
    if s.text == "clip":  # transformers' CLIPTextModel on both sides
        yield Rule(f"{CLIP_PREFIX}text_model", TEXT, ("text_model",))
        return
    p, d = OPENCLIP_PREFIX, "text_model"
    yield from _pairs(f"{p}token_embedding", TEXT, f"{d}.embeddings.token_embedding")
    yield from _pairs(f"{p}positional_embedding", TEXT, f"{d}.embeddings.position_embedding.weight")
    yield from _pairs(f"{p}ln_final", TEXT, f"{d}.final_layer_norm")
    for i in range(s.text_layers):
        block, layer = f"{p}transformer.resblocks.{i}", f"{d}.encoder.layers.{i}"
        yield from _pairs(block, TEXT, layer, _OPENCLIP_BLOCK)
        for param in ("weight", "bias"):
            qkv = tuple(f"{layer}.self_attn.{x}_proj.{param}" for x in "qkv")
            yield Rule(f"{block}.attn.in_proj_{param}", TEXT, qkv, "rows")


class Layout:
    """The table for one model structure, looked up from either side."""

    def __init__(self, structure: Structure):
        self.structure = structure
        rules = [*_unet_rules(structure), *_vae_rules(structure), *_text_rules(structure)]
        self._by_sd = {r.sd: r for r in rules}
        self._by_diffusers = {
            (r.component, d): (r, i) for r in rules for i, d in enumerate(r.diffusers)
        }

    def to_diffusers(self, sd_key: str) -> list[Target] | None:
        """The diffusers (component, key)s holding an SD key; None when diffusers has no place
        for it (schedule buffers, EMA copies, SD v2's unused last text block and projection)."""
        match = _longest_prefix(sd_key, self._by_sd)
        if match is None:
            return None
        rule, rest = match
        parts = len(rule.diffusers)
        return [
            Target(d + rest, rule.component, _kind(rule.kind, rest), i, parts)
            for i, d in enumerate(rule.diffusers)
        ]

    def to_sd(self, component: str, key: str) -> Target | None:
        """The SD key holding a diffusers key (for `rows`, which block of its rows)."""
        found = _longest_prefix(key, self._by_diffusers, component)
        if found is None:
            return None
        (rule, part), rest = found
        kind = _kind(rule.kind, rest)
        return Target(rule.sd + rest, rule.component, kind, part, len(rule.diffusers))


def _kind(kind: str, rest: str) -> str:
    """conv1x1 changes only the weight's shape; the bias is the same on both sides."""
    return "same" if kind == "conv1x1" and rest != ".weight" else kind


def _longest_prefix(key: str, table: dict, component: str | None = None):
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        entry = table.get(head if component is None else (component, head))
        if entry is not None:
            rest = key[len(head) :]
            return entry, rest
    return None


def to_diffusers_value(tensor: torch.Tensor, target: Target) -> torch.Tensor:
    """An SD tensor as diffusers stores it at `target` (views where possible)."""
    if target.kind == "conv1x1":
        return tensor[:, :, 0, 0]  # [C, C, 1, 1] -> [C, C]
    if target.kind == "rows":
        # A copy: the three blocks would share memory, which safetensors refuses to save.
        return tensor.chunk(target.parts, dim=0)[target.part].clone()
    return tensor


def to_sd_value(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The SD tensor from the diffusers tensor(s) that hold it (all row blocks for `rows`)."""
    if kind == "conv1x1":
        return parts[0][:, :, None, None]  # [C, C] -> [C, C, 1, 1]
    if kind == "rows":
        return torch.cat(parts, dim=0)
    return parts[0]
