"""Tiny diffusers SD v1/v2 pipelines built and saved by diffusers itself (not by our writer), with
the structure of configs/stable-diffusion/v{1,2}-tiny.yaml."""

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.tokenizer import clip_tokenizer


def tiny_pipeline(version: str, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    v2 = version == "v2"
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=[2, 4] if v2 else 2,
        use_linear_projection=v2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=128 if v2 else 64,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="gelu" if v2 else "quick_gelu",
            projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v2 else "epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = clip_tokenizer("!" if v2 else "<|endoftext|>")
    with torch.no_grad():  # diffusers zero-initialises nothing that matters, but be sure
        for p in unet.parameters():
            if p.abs().max() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder as `component/key` (text encoder keys with their
    `text_model.` level, whichever transformers version wrote them)."""
    out = {}
    for file in sorted(folder.glob("*/*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                name = key
                if file.parent.name == "text_encoder" and not key.startswith("text_model."):
                    name = f"text_model.{key}"
                out[f"{file.parent.name}/{name}"] = f.get_tensor(key)
    return out


def pipeline_images(pipe, prompt: str, x_T: torch.Tensor, steps: int, scale: float) -> np.ndarray:
    """uint8 images [B, H, W, 3] from the pipeline, started from the latents x_T."""
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [prompt] * len(x_T),
        height=x_T.shape[2] * 8,
        width=x_T.shape[3] * 8,
        num_inference_steps=steps,
        guidance_scale=scale,
        latents=x_T.clone(),
        output_type="np",
    ).images
    return (images * 255.0).round().astype(np.uint8)
