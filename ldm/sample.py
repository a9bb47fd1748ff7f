"""Text-to-image with DDIM or DPM-Solver++ and classifier-free guidance: the one path that txt2img, prior (class)
image sampling, training-time sample grids and evaluation all use."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import _atomic_write
from ldm.models.diffusion.captured import make_sampler
from ldm.util import autocast, precision_dtype


def seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Start noise [len(seeds), *shape], each sample from its own CPU generator: sample i is the
    same whatever the batch it is drawn in, so interrupted runs resume to the same images."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def prepare_for_sampling(model, device: torch.device | str, precision: str = "full"):
    """The model frozen, in eval mode, on `device`. On CUDA with fp16/bf16 the networks are cast
    to that dtype (half the memory, and autocast no longer re-casts every weight at every step);
    the schedule buffers stay float32, so the DDIM maths is unchanged."""
    model.eval().requires_grad_(False)
    dtype = precision_dtype(precision)
    # Not on CPU: its autocast leaves GroupNorm's half weights against float32 inputs.
    if dtype is not None and torch.device(device).type == "cuda":
        for net in (model.model, model.first_stage_model, model.cond_stage_model):
            net.to(device=device, dtype=dtype)
    return model.to(device)


@torch.no_grad()
def generate(
    model,
    prompts: list[str],
    x_T: torch.Tensor,
    ddim_steps: int = 50,
    scale: float = 7.5,
    eta: float = 0.0,
    negative_prompt: str = "",
    precision: str = "autocast",
    generator: torch.Generator | None = None,
    verbose: bool = False,
    capture: bool = False,
    callback=None,
    sampler: str = "ddim",
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] for prompts [B] from start latents x_T [B, C, h, w].

    The negative prompt (empty by default) is the unconditional conditioning of the guidance.
    `sampler`: "ddim" or "dpmpp_2m" (DPM-Solver++(2M): ~20-25 steps where DDIM takes 50;
    deterministic, so eta must be 0), `ddim_steps` UNet calls either way. `capture` replays the
    guided UNet call from a CUDA graph (ldm.models.diffusion.captured; unverified on a GPU, the
    plain sampler without CUDA); `callback(i)` follows step i.
    """
    device = model.betas.device
    with autocast(device, precision):
        c = model.get_learned_conditioning(list(prompts))
        uc = None
        if scale != 1.0:
            uc = model.get_learned_conditioning([negative_prompt] * len(prompts))
        z, _ = make_sampler(model, sampler, capture, precision).sample(
            S=ddim_steps,
            batch_size=len(prompts),
            shape=tuple(x_T.shape[1:]),
            conditioning=c,
            unconditional_guidance_scale=scale,
            unconditional_conditioning=uc,
            eta=eta,
            x_T=x_T,
            generator=generator,
            verbose=verbose,
            callback=callback,
        )
        images = model.decode_first_stage(z.to(next(model.first_stage_model.parameters()).dtype))
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a fresh temporary file and rename it over `path`: an interrupted write never leaves
    a truncated PNG (which a resumed run would count as done), and a file or link planted in the
    folder (a downloaded class-image set may hold one) is replaced, never written through."""
    _atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> RGB PIL images."""
    array = (images.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]
