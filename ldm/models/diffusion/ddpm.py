"""LatentDiffusion as a plain nn.Module: the diffusion process in the VAE's latent space.

It owns the UNet (`model.diffusion_model`), the VAE (`first_stage_model`), the text encoder
(`cond_stage_model`) and the noise schedule buffers, with the attribute names that make its state
dict the Stable Diffusion checkpoint layout. It never logs and knows nothing of optimizers or ranks;
what trains and what is frozen is decided by the training code.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


def schedule_buffers(betas: np.ndarray) -> dict[str, torch.Tensor]:
    """The schedule buffers of SD checkpoints (CompVis names), computed in float64 from the
    betas and stored in float32."""
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7); SD checkpoints store these.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
        * np.sqrt(1.0 - betas)
        / (1.0 - alphas_cumprod),
    }
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in buffers.items()}


class DiffusionWrapper(nn.Module):
    """Holds the UNet under the name `diffusion_model` and routes the text context into it."""

    def __init__(self, diff_model_config, conditioning_key: str):
        super().__init__()
        if conditioning_key != "crossattn":
            raise ValueError(
                f"conditioning_key {conditioning_key!r} is not supported (SD uses 'crossattn')"
            )
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: list) -> torch.Tensor:
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, dim=1))


class LatentDiffusion(nn.Module):
    """Stable Diffusion's latent diffusion model (eps- or v-parameterised).

    Constructor arguments follow CompVis so its YAML configs load unchanged. Arguments that only
    drove the Lightning module there (`monitor`, `log_every_t`, `first_stage_key`,
    `cond_stage_key`, `scheduler_config`, `cond_stage_trainable`, `num_timesteps_cond`) are
    accepted and have no effect: training settings live in the config's `train` section.
    """

    def __init__(
        self,
        first_stage_config,
        cond_stage_config,
        unet_config,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas=None,
        parameterization: str = "eps",
        scale_factor: float = 1.0,
        conditioning_key: str = "crossattn",
        image_size: int = 64,
        channels: int = 4,
        use_ema: bool = False,
        loss_type: str = "l2",
        cond_stage_trainable: bool = False,
        num_timesteps_cond: int = 1,
        first_stage_key: str = "image",
        cond_stage_key: str = "txt",
        monitor: str | None = None,
        log_every_t: int = 100,
        scheduler_config=None,
    ):
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        if loss_type != "l2":
            raise ValueError(f"loss_type {loss_type!r} is not supported (SD trains with 'l2')")
        if num_timesteps_cond != 1:
            raise ValueError("num_timesteps_cond other than 1 is not supported")
        self.parameterization = parameterization
        self.scale_factor = scale_factor
        self.image_size = image_size
        self.channels = channels
        self.cond_stage_trainable = cond_stage_trainable
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.register_schedule(
            given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s
        )

    def register_schedule(
        self,
        given_betas=None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """The schedule buffers, computed in float64 and stored in float32 (CompVis names)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = len(betas)
        for name, value in schedule_buffers(betas).items():
            self.register_buffer(name, value)

    # Forward process and parameterisations.

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x
        )

    def predict_start_from_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_start_from_z_and_v(
        self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def predict_eps_from_z_and_v(
        self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        )

    def get_target(
        self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network regresses: eps, or v."""
        return noise if self.parameterization == "eps" else self.get_v(x_start, noise, t)

    # First stage and conditioning.

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent [C, h, w] of an image of height x width pixels."""
        f = self.first_stage_model.downsample_factor
        return (self.channels, height // f, width // f)

    def encode_first_stage(self, x: torch.Tensor):
        """Images [B, 3, H, W] in [-1, 1] -> the VAE posterior over [B, 4, H/8, W/8]."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(
        self, posterior, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A latent sample of the posterior, scaled to unit variance by `scale_factor`."""
        return self.scale_factor * posterior.sample(generator=generator)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, c) -> torch.Tensor:
        """Prompts (list of str) or token ids [B, 77] -> text embeddings [B, 77, context_dim]."""
        return self.cond_stage_model.encode(c)

    # The network and the loss.

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """UNet output for noisy latents [B, 4, h, w], timesteps [B] and context [B, L, D]."""
        if isinstance(cond, dict):  # CompVis passes {"c_crossattn": [context]}
            cond = cond["c_crossattn"]
        if not isinstance(cond, (list, tuple)):
            cond = [cond]
        return self.model(x_noisy, t, c_crossattn=list(cond))

    def p_losses(
        self,
        x_start: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Simple diffusion loss, one value per sample [B]: mean over latent elements of
        || target - model(x_t, t, c) ||^2, computed in float32 whatever the autocast dtype."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = self.get_target(x_start, noise, t)
        return F.mse_loss(model_output.float(), target.float(), reduction="none").mean(
            dim=(1, 2, 3)
        )
