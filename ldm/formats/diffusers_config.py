"""diffusers' component configs of a Stable Diffusion model config (`model:` of our YAML), the
name-table structure of either, and the check that a diffusers folder is what a config builds.

The config facts are those of diffusers' create_unet_diffusers_config_from_ldm and
create_vae_diffusers_config_from_ldm (single_file_utils), and of the SD v1/v2 folders on the Hub.
"""

from collections.abc import Mapping
from typing import Any

import open_clip
from omegaconf import DictConfig, OmegaConf

from ldm.formats.layout import Structure
from ldm.modules.encoders.modules import CLIP_TEXT_CONFIGS

DIFFUSERS_VERSION = (
    "0.25.0"  # the format these configs follow; diffusers only reads it for warnings
)
CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
# CompVis beta schedules <-> diffusers': CompVis "linear" is diffusers' "scaled_linear".
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


class FormatError(ValueError):
    """A model config that has no diffusers form (one line, naming the setting)."""


def _plain(config: Any) -> dict:
    return (
        OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    )


def _params(model_config: Mapping) -> tuple[dict, dict, dict, dict]:
    """(LatentDiffusion, UNet, VAE ddconfig, text encoder) parameters of a model config."""
    p = _plain(model_config)["params"]
    return p, p["unet_config"]["params"], p["first_stage_config"]["params"], p["cond_stage_config"]


def _heads(unet: dict) -> list[int]:
    """Attention heads per level (what diffusers calls attention_head_dim for SD)."""
    channels = [unet["model_channels"] * m for m in unet["channel_mult"]]
    if unet.get("num_head_channels", -1) != -1:
        return [c // unet["num_head_channels"] for c in channels]
    return [unet["num_heads"]] * len(channels)


def _attention(unet: dict) -> list[bool]:
    return [2**b in unet["attention_resolutions"] for b in range(len(unet["channel_mult"]))]


def text_encoder_config(cond: dict) -> dict[str, Any]:
    """transformers' CLIPTextConfig fields of the text encoder, as diffusers stores it. SD v2's
    is OpenCLIP's text tower without its last block (SD v2 conditions on the penultimate one)."""
    params = cond.get("params", {}) or {}
    if cond["target"] == CLIP_EMBEDDER:
        if params.get("layer", "last") != "last":
            raise FormatError("FrozenCLIPEmbedder layer other than 'last' has no diffusers form")
        version = params.get("version", "openai/clip-vit-large-patch14")
        return {**CLIP_TEXT_CONFIGS[version], **(params.get("text_config") or {})}
    if cond["target"] != OPENCLIP_EMBEDDER:
        raise FormatError(f"text encoder {cond['target']} has no diffusers form")
    if params.get("layer", "last") != "penultimate":
        raise FormatError(
            "SD v2's diffusers text encoder is the penultimate layer: need layer: penultimate"
        )
    arch = open_clip.get_model_config(params.get("arch", "ViT-H-14"))
    text = {**arch["text_cfg"], "embed_dim": arch["embed_dim"], **(params.get("text_config") or {})}
    return dict(
        vocab_size=text.get("vocab_size", 49408),
        hidden_size=text["width"],
        intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=text["layers"] - 1,
        num_attention_heads=text["heads"],
        max_position_embeddings=text.get("context_length", 77),
        hidden_act="quick_gelu" if arch.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,
        projection_dim=text["embed_dim"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )


def diffusers_configs(model_config: Mapping) -> dict[str, dict]:
    """unet, vae, text_encoder and scheduler configs of a Stable Diffusion model config."""
    ld, unet, vae, cond = _params(model_config)
    dd = vae["ddconfig"]
    if vae.get("embed_dim", 4) != dd["z_channels"]:
        raise FormatError("AutoencoderKL embed_dim != z_channels has no diffusers form")
    if unet.get("disable_self_attentions") or unet.get("disable_middle_self_attn"):
        raise FormatError("UNet disable_self_attentions has no diffusers form here")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in _attention(unet)]
    heads = _heads(unet)
    context = unet["context_dim"]
    parameterization = ld.get("parameterization", "eps")
    schedule = ld.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES or ld.get("given_betas") is not None:
        raise FormatError(f"beta_schedule {schedule!r} has no diffusers form")
    return {
        "unet": dict(
            sample_size=ld.get("image_size", 64),
            in_channels=unet["in_channels"],
            out_channels=unet["out_channels"],
            down_block_types=down,
            up_block_types=[b.replace("Down", "Up") for b in reversed(down)],
            block_out_channels=[unet["model_channels"] * m for m in unet["channel_mult"]],
            layers_per_block=unet["num_res_blocks"],
            cross_attention_dim=context[0] if isinstance(context, list) else context,
            attention_head_dim=heads if unet.get("num_head_channels", -1) != -1 else heads[0],
            use_linear_projection=unet.get("use_linear_in_transformer", False),
            transformer_layers_per_block=unet.get("transformer_depth", 1),
            # What SD 2.1-v's own diffusers release sets: its attention overflows in fp16.
            upcast_attention=parameterization == "v",
        ),
        "vae": dict(
            sample_size=ld.get("image_size", 64) * 2 ** (len(dd["ch_mult"]) - 1),
            in_channels=dd["in_channels"],
            out_channels=dd["out_ch"],
            down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
            up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
            block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]],
            latent_channels=dd["z_channels"],
            layers_per_block=dd["num_res_blocks"],
            scaling_factor=ld.get("scale_factor", 1.0),
        ),
        "text_encoder": text_encoder_config(cond),
        "scheduler": dict(
            num_train_timesteps=ld.get("timesteps", 1000),
            beta_start=ld.get("linear_start", 1e-4),
            beta_end=ld.get("linear_end", 2e-2),
            beta_schedule=BETA_SCHEDULES[schedule],
            prediction_type=PREDICTION_TYPES[parameterization],
        ),
    }


def structure_of_config(model_config: Mapping) -> Structure:
    """The name-table structure of a model config."""
    _, unet, vae, cond = _params(model_config)
    dd = vae["ddconfig"]
    openclip = cond["target"] == OPENCLIP_EMBEDDER
    if openclip:
        layers = text_encoder_config(cond)["num_hidden_layers"]
    else:
        params = cond.get("params", {}) or {}
        version = params.get("version", "openai/clip-vit-large-patch14")
        text = {**CLIP_TEXT_CONFIGS[version], **(params.get("text_config") or {})}
        layers = text["num_hidden_layers"]
    return Structure(
        unet_attention=tuple(_attention(unet)),
        unet_layers=unet["num_res_blocks"],
        vae_levels=len(dd["ch_mult"]),
        vae_layers=dd["num_res_blocks"],
        text="openclip" if openclip else "clip",
        text_layers=layers,
    )


def text_family(text_config: Mapping) -> str:
    """SD v1 and v2 store the text encoder as the same class: OpenAI's CLIP uses quick_gelu,
    OpenCLIP's ViT-H/14 (SD v2) the exact GELU."""
    return "clip" if text_config.get("hidden_act") == "quick_gelu" else "openclip"


def structure_of_folder(configs: Mapping[str, Mapping]) -> Structure:
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    return Structure(
        unet_attention=tuple(t.startswith("CrossAttn") for t in unet["down_block_types"]),
        unet_layers=unet.get("layers_per_block", 2),
        vae_levels=len(vae["block_out_channels"]),
        vae_layers=vae.get("layers_per_block", 2),
        text=text_family(text),
        text_layers=text["num_hidden_layers"],
    )


# Defaults of diffusers' UNet2DConditionModel, AutoencoderKL and schedulers, for configs that omit a field.
_DEFAULTS = {
    "unet": dict(in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=1280,
                 attention_head_dim=8, use_linear_projection=False, transformer_layers_per_block=1),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                scaling_factor=0.18215),
    "text_encoder": dict(vocab_size=49408, max_position_embeddings=77),
    "scheduler": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                      beta_schedule="linear", prediction_type="epsilon"),
}  # fmt: skip
_COMPARED = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
             "cross_attention_dim", "attention", "heads", "use_linear_projection",
             "transformer_layers_per_block"),
    "vae": ("in_channels", "out_channels", "block_out_channels", "latent_channels",
            "layers_per_block", "scaling_factor"),
    "text_encoder": ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "vocab_size", "max_position_embeddings"),
    "scheduler": ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                  "prediction_type"),
}  # fmt: skip
_FAMILIES = {"clip": "SD v1 (CLIP text encoder)", "openclip": "SD v2 (OpenCLIP text encoder)"}


def _normalised(component: str, config: Mapping) -> dict:
    """A component config with diffusers' defaults filled in and per-level lists spelt out."""
    c = {**_DEFAULTS[component], **config}
    if component == "unet":
        levels = len(c["block_out_channels"])
        heads = c.get("num_attention_heads") or c["attention_head_dim"]
        c["heads"] = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
        c["attention"] = [t.startswith("CrossAttn") for t in c["down_block_types"]]
        depth = c["transformer_layers_per_block"]
        c["transformer_layers_per_block"] = depth if isinstance(depth, list) else [depth] * levels
    return {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}


def mismatches(folder: Mapping[str, Mapping], model_config: Mapping) -> list[str]:
    """The structural settings in which a diffusers folder's configs differ from what
    `model_config` builds, as "component.field folder-value vs config-value"; [] when none.
    A different text-encoder family is the one entry when it is found."""
    ours = diffusers_configs(model_config)
    theirs_family, ours_family = (
        text_family(folder["text_encoder"]),
        text_family(ours["text_encoder"]),
    )
    if theirs_family != ours_family:
        return [
            f"the folder is {_FAMILIES[theirs_family]} but the config builds {_FAMILIES[ours_family]}"
        ]
    wrong = []
    for component, fields in _COMPARED.items():
        a, b = _normalised(component, folder[component]), _normalised(component, ours[component])
        wrong += [f"{component}.{f} {a[f]} vs {b[f]}" for f in fields if a[f] != b[f]]
    return wrong
