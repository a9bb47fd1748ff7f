"""The complete key set of a released SD v1 checkpoint, written out from CompVis's naming rules
(not read from this code's modules), loads strictly into the full-size config on the meta
device: no missing, no unexpected key."""

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import empty_parameters, load_state_into
from ldm.util import instantiate_from_config

from .conftest import CONFIGS

SCHEDULE = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
]  # fmt: skip
WB = ("weight", "bias")


def _wb(prefix: str, *names: str) -> list[str]:
    return [f"{prefix}{n}.{p}" for n in names for p in WB]


def _resblock(prefix: str, skip: bool) -> list[str]:
    names = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"]
    return _wb(prefix, *names, *(["skip_connection"] if skip else []))


def _transformer(prefix: str) -> list[str]:
    block = f"{prefix}transformer_blocks.0."
    qkv = [f"{block}attn{i}.to_{x}.weight" for i in (1, 2) for x in "qkv"]
    parts = ["attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2"]
    return _wb(prefix, "norm", "proj_in", "proj_out") + qkv + _wb(block, *parts, "norm3")


def unet_keys() -> list[str]:
    """SD v1 UNet: channel_mult [1, 2, 4, 4], 2 res blocks, attention on the first three levels."""
    keys = _wb("", "time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2")
    block = 1
    for level in range(4):
        for i in range(2):
            keys += _resblock(f"input_blocks.{block}.0.", skip=level in (1, 2) and i == 0)
            keys += _transformer(f"input_blocks.{block}.1.") if level < 3 else []
            block += 1
        if level < 3:
            keys += _wb(f"input_blocks.{block}.0.", "op")
            block += 1
    keys += _resblock("middle_block.0.", False) + _transformer("middle_block.1.")
    keys += _resblock("middle_block.2.", False)
    for block in range(12):
        level = 3 - block // 3
        keys += _resblock(f"output_blocks.{block}.0.", skip=True)
        keys += _transformer(f"output_blocks.{block}.1.") if level < 3 else []
        if block in (2, 5, 8):
            keys += _wb(f"output_blocks.{block}.{1 if level == 3 else 2}.", "conv")
    return [f"model.diffusion_model.{k}" for k in keys]


def vae_keys() -> list[str]:
    """AutoencoderKL f=8: ch 128, ch_mult [1, 2, 4, 4], 2 res blocks (3 in the decoder)."""

    def block(prefix: str, shortcut: bool) -> list[str]:
        return _wb(
            prefix, "norm1", "conv1", "norm2", "conv2", *(["nin_shortcut"] if shortcut else [])
        )

    def mid(prefix: str) -> list[str]:
        attn = _wb(f"{prefix}mid.attn_1.", "norm", "q", "k", "v", "proj_out")
        return block(f"{prefix}mid.block_1.", False) + attn + block(f"{prefix}mid.block_2.", False)

    keys = _wb("", "quant_conv", "post_quant_conv")
    keys += _wb("encoder.", "conv_in", "norm_out", "conv_out") + mid("encoder.")
    for level in range(4):
        for i in range(2):
            keys += block(f"encoder.down.{level}.block.{i}.", level in (1, 2) and i == 0)
        keys += _wb(f"encoder.down.{level}.downsample.", "conv") if level < 3 else []
    keys += _wb("decoder.", "conv_in", "norm_out", "conv_out") + mid("decoder.")
    for level in range(4):
        for i in range(3):
            keys += block(f"decoder.up.{level}.block.{i}.", level in (0, 1) and i == 0)
        keys += _wb(f"decoder.up.{level}.upsample.", "conv") if level > 0 else []
    return [f"first_stage_model.{k}" for k in keys]


def clip_keys() -> list[str]:
    """CLIP ViT-L/14 text tower as transformers 4 saved it (position_ids included)."""
    prefix = "cond_stage_model.transformer.text_model."
    keys = [f"{prefix}embeddings.{n}" for n in ("token_embedding.weight", "position_embedding.weight", "position_ids")]  # fmt: skip
    parts = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"]
    parts += ["layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"]
    for layer in range(12):
        keys += _wb(f"{prefix}encoder.layers.{layer}.", *parts)
    return keys + _wb(prefix, "final_layer_norm")


def real_v1_keys(full_ema: bool) -> list[str]:
    keys = unet_keys() + vae_keys() + clip_keys() + SCHEDULE
    if full_ema:
        keys += ["model_ema.decay", "model_ema.num_updates"]
        keys += [f"model_ema.{k[len('model.') :].replace('.', '')}" for k in unet_keys()]
    return keys


def test_the_real_key_set_counts():
    assert (len(unet_keys()), len(vae_keys()), len(clip_keys())) == (686, 248, 197)
    assert len(real_v1_keys(False)) == 1143 and len(real_v1_keys(True)) == 1831
    assert len(set(real_v1_keys(True))) == 1831


def test_real_v1_key_set_loads_strictly_into_the_full_size_config_on_meta():
    config = OmegaConf.load(CONFIGS / "stable-diffusion" / "v1-inference.yaml").model
    with empty_parameters():  # parameters on the meta device: no memory
        model = instantiate_from_config(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for full_ema in (False, True):
        source = {}
        for key in real_v1_keys(full_ema):
            # Shapes as the model has them (the key names are what this test is about).
            model_key = key if key in shapes else None
            if key.startswith("model_ema.diffusion_model"):
                model_key = next(k for k in unet_keys() if k[6:].replace(".", "") == key[10:])
            shape = shapes[model_key] if model_key else ()
            source[key] = torch.empty(shape, device="meta")
        source["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(
            1, 77, device="meta", dtype=torch.long
        )
        load_state_into(model, source, use_ema=full_ema, path="sd-v1-real-keys")
        assert all(p.is_meta for p in model.parameters())
