"""Small building blocks shared by the UNet and the diffusion process (CompVis names)."""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas in float64. Stable Diffusion uses "linear", which is the "scaled linear" schedule:
    linspace(sqrt(start), sqrt(end)) ** 2."""
    if schedule == "linear":
        betas = (
            torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
        )
    elif schedule == "cosine":
        # Nichol & Dhariwal (2021), eq. 17.
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}")
    return betas.numpy()


def make_ddim_timesteps(num_ddim_timesteps: int, num_ddpm_timesteps: int) -> np.ndarray:
    """CompVis "uniform" DDIM timesteps: range(0, T, T // S) + 1 (50 of 1000 -> 1, 21, ..., 981)."""
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"ddim_steps must be in 1..{num_ddpm_timesteps}, got {num_ddim_timesteps}")
    c = num_ddpm_timesteps // num_ddim_timesteps
    # CompVis's grid exactly, +1 included, so images match it for every S (an S that does not
    # divide T gets one step more there too, e.g. 8 for S=7). Where that grid would index past
    # the schedule (S=3 or S=1000 give 1000, an IndexError in CompVis) it ends at T - 1 instead.
    steps = np.asarray(list(range(0, num_ddpm_timesteps, c))) + 1
    return np.unique(np.minimum(steps, num_ddpm_timesteps - 1))


def make_ddim_sampling_parameters(
    alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alphas, alphas_prev and sigmas of DDIM (Song et al. 2021, eq. 16)."""
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather a[t] per sample and reshape to [B, 1, 1, ...] to broadcast against x."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def checkpoint(func, inputs: tuple, params, flag: bool):
    """Gradient checkpointing of `func(*inputs)` when `flag` and gradients are needed.

    Kept with CompVis's signature; `params` is unused because the non-reentrant implementation
    finds the parameters itself.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embeddings [B, dim] of (possibly fractional) timesteps [B], cat([cos, sin])."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of a module (output projections start as identity residuals)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (CompVis): half-precision statistics overflow. The affine
    parameters are taken to float32 too: a frozen UNet held in bf16 (LoRA training) would
    otherwise meet float32 inputs, which the CPU kernel refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: 32 groups, eps 1e-5."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs) -> nn.Module:
    return nn.Linear(*args, **kwargs)
