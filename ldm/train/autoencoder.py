"""Training an autoencoder (the VAE) from scratch, for the toy world's base model.

DreamBooth never trains the VAE, and the VAE's objective is not the diffusion loss: it is
reconstruction plus a small KL term towards N(0, I) (Rombach et al. 2022, Sec. 3), so it gets this
short loop of its own instead of a corner of the DreamBooth loop. Stable Diffusion's VAE also had
perceptual and adversarial terms; the toy world's flat-coloured images reconstruct well from L1 and
L2 alone. The scale factor that makes latents unit-variance is measured as SD's was (1 / std).
"""

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldm.models.autoencoder import AutoencoderKL
from ldm.util import autocast


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def autoencoder_loss(
    vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, KL) for images x [B, 3, H, W] in [-1, 1]; the posterior sample uses
    `noise` (the caller's seeded draw). Reconstruction is L1 + L2 per pixel; KL is per latent
    element, KL(N(mean, var) || N(0, 1)) = (mean^2 + var - 1 - log var) / 2."""
    posterior = vae.encode(x)
    x_rec = vae.decode(posterior.sample(noise=noise)).float()
    rec = F.l1_loss(x_rec, x) + F.mse_loss(x_rec, x)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return rec + kl_weight * kl, rec.detach(), kl.detach()


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random `size` x `size` crop of each image, flipped horizontally half the time."""
    b, _, h, w = images.shape
    ys = torch.randint(0, h - size + 1, (b,), generator=generator).tolist()
    xs = torch.randint(0, w - size + 1, (b,), generator=generator).tolist()
    flips = (torch.rand(b, generator=generator) < 0.5).tolist()
    crops = [
        img[:, y : y + size, x : x + size].flip(-1) if f else img[:, y : y + size, x : x + size]
        for img, y, x, f in zip(images, ys, xs, flips)
    ]
    return torch.stack(crops)


def train_autoencoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    crop: int | None = None,
    seed: int = 0,
    precision: str = "32",
    log: Callable[[dict], None] | None = None,
    log_every: int = 100,
) -> None:
    """Train `vae` in place on `images` (uint8 [N, 3, H, W]) for `steps` AdamW steps with a
    linear warm-up and cosine decay. `crop` trains on random crops of that size: the networks are
    convolutional, so a model trained on crops applies to whole images, at a fraction of the cost
    per step. `precision` "bf16" runs the networks under bf16 autocast (2x faster on CPUs with
    AMX or AVX512-BF16). Every draw comes from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    vae.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        batch = images[index]
        if crop is not None:
            batch = random_crops(batch, crop, generator)
        x = to_unit_range(batch)
        f = vae.downsample_factor
        noise = torch.randn(
            (x.shape[0], vae.embed_dim, x.shape[2] // f, x.shape[3] // f), generator=generator
        )
        with autocast(x.device, precision):
            loss, rec, kl = autoencoder_loss(vae, x, kl_weight, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log is not None and (step % log_every == 0 or step == steps):
            seconds = time.perf_counter() - start
            log({"step": step, "rec": rec.item(), "kl": kl.item(), "seconds": seconds})
    vae.eval()


@torch.no_grad()
def evaluate_autoencoder(
    vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64
) -> dict[str, float]:
    """PSNR of the reconstructions (posterior mean) of `images` (uint8), and the latents' std,
    whose inverse is the scale factor that makes them unit-variance for the diffusion model."""
    squared_error, latents = 0.0, []
    for part in images.split(batch_size):
        x = to_unit_range(part)
        posterior = vae.encode(x)
        x_rec = vae.decode(posterior.mean).clamp(-1, 1)
        squared_error += (x_rec - x).pow(2).mean(dim=(1, 2, 3)).sum().item()
        latents.append(posterior.mean)
    mse = squared_error / images.shape[0] / 4.0  # [-1, 1] -> [0, 1] scale
    std = torch.cat(latents).std().item()
    return {"psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "latent_std": std}
