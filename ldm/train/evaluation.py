"""What the loop measures besides the training loss: a deterministic validation loss on the
instance images (fixed timesteps, fixed noise) that picks `best.ckpt`, and sample grids for fixed
prompts and seeds, so drift of the subject and of the class prior is visible over training."""

from contextlib import contextmanager

import torch
from torchvision.utils import make_grid

from ldm.data.dreambooth import DreamBoothDataset, format_prompt
from ldm.data.images import image_to_tensor, load_rgb, resize_crop
from ldm.models.diffusion.captured import release_graphs
from ldm.sample import generate, seeded_noise
from ldm.util import autocast, keyed_seed


@contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode (LoRA's dropout off) for a measurement, then as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)


class Validation:
    """Mean diffusion loss of the instance images (center crop, no flip, posterior mean; at most
    `MAX_IMAGES`, evenly spaced, for a large captioned set), each with its own prompt, at
    `num_timesteps` evenly spaced timesteps with noise fixed by (seed, image, timestep)."""

    MAX_IMAGES = 32

    def __init__(self, model, dataset: DreamBoothDataset, num_timesteps: int, seed: int, device):
        count = len(dataset.instance_paths)
        images = torch.linspace(0, count - 1, min(count, self.MAX_IMAGES)).round().long().tolist()
        # Center crops whatever the training crop is: the validation set must not move.
        pixels = torch.stack(
            [
                image_to_tensor(resize_crop(load_rgb(dataset.instance_paths[i]), dataset.size))
                for i in images
            ]
        )
        dtype = next(model.first_stage_model.parameters()).dtype
        with torch.no_grad():
            posterior = model.encode_first_stage(pixels.to(device=device, dtype=dtype))
        latents = model.scale_factor * posterior.mean.float()  # [N, C, h, w]
        steps = torch.linspace(0, model.num_timesteps - 1, num_timesteps).round().long()
        n = latents.shape[0]
        # [N, C, h, w] -> [N * T, C, h, w], image-major
        self.latents = latents.repeat_interleave(num_timesteps, dim=0)
        self.t = steps.repeat(n).to(device)
        self.noise = torch.stack(
            [
                torch.randn(
                    latents.shape[1:],
                    generator=torch.Generator().manual_seed(keyed_seed(seed, "val", i, j)),
                )
                for i in range(n)
                for j in range(num_timesteps)
            ]
        ).to(device)
        prompts = [dataset.prompts[dataset.instance_prompt_ids[i]] for i in images]
        tokens = model.cond_stage_model.tokenize(prompts)  # [N, 77]
        self.tokens = tokens.repeat_interleave(num_timesteps, dim=0).to(device)

    @torch.no_grad()
    def loss(self, model, precision: str, batch_size: int = 8) -> float:
        total = 0.0
        with evaluating(model), autocast(self.t.device, precision):
            for start in range(0, self.t.shape[0], batch_size):
                part = slice(start, start + batch_size)
                cond = model.get_learned_conditioning(self.tokens[part])
                loss = model.p_losses(
                    self.latents[part], cond, self.t[part], noise=self.noise[part]
                )
                total += loss.sum().item()
        return total / self.t.shape[0]


@torch.no_grad()
def sample_grid(
    model, sample_cfg, token: str, class_word: str, size: int, precision: str, capture=False
) -> torch.Tensor:
    """A grid [3, H, W] in [0, 1]: one row per prompt, `n_per_prompt` fixed seeds per row.
    `capture`: DDIM replays a CUDA graph, freed after the grid (its memory is not held between
    grids, and recording it again costs about one step)."""
    prompts = [format_prompt(p, token, class_word) for p in sample_cfg.prompts]
    n = sample_cfg.n_per_prompt
    seeds = [sample_cfg.seed + j for _ in prompts for j in range(n)]
    x_T = seeded_noise(seeds, model.latent_shape(size, size))
    with evaluating(model):
        images = generate(
            model,
            [p for p in prompts for _ in range(n)],
            x_T,
            ddim_steps=sample_cfg.ddim_steps,
            sampler=sample_cfg.sampler,
            scale=sample_cfg.scale,
            precision=precision,
            capture=capture,
        )
    release_graphs(model)
    return make_grid(images.cpu(), nrow=n)
