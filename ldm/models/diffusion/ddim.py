"""DDIM sampling (Song et al. 2021) with classifier-free guidance, as in CompVis's ddim.py."""

import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import (
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)


class DDIMSampler:
    """Wraps a LatentDiffusion model; `sample` returns latents and the intermediate x0 guesses.
    A subclass with another update rule (DPM-Solver++) supplies `make_schedule` and `step`.

    Deterministic given `x_T` and a `generator` (the generator is only drawn from on the CPU, so a
    seed gives the same start noise on every device).
    """

    def __init__(self, model, schedule: str = "linear"):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0
    ) -> None:
        if ddim_discretize != "uniform":
            raise ValueError(f"ddim_discretize {ddim_discretize!r} is not supported")
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps)
        alphas_cumprod = self.model.alphas_cumprod.double().cpu().numpy()
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            alphas_cumprod, self.ddim_timesteps, ddim_eta
        )
        device = self.model.alphas_cumprod.device
        as_tensor = lambda a: torch.tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        self.ddim_sigmas = as_tensor(sigmas)
        self.stochastic = bool((sigmas > 0).any())  # decided on the host: no sync per step
        self.ddim_alphas = as_tensor(alphas)
        self.ddim_alphas_prev = as_tensor(alphas_prev)
        self.ddim_sqrt_one_minus_alphas = as_tensor((1.0 - alphas) ** 0.5)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning=None,
        callback=None,
        img_callback=None,
        eta: float = 0.0,
        temperature: float = 1.0,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        verbose: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Sample latents [batch_size, *shape] in S DDIM steps.

        `conditioning` and `unconditional_conditioning` are text embeddings [B, L, D]; a negative
        prompt's embedding goes in as the unconditional one. `callback(i)` and
        `img_callback(pred_x0, i)` are called after every step.
        """
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta)
        device = self.model.betas.device
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), generator=generator)
        x = x_T.to(device=device, dtype=torch.float32)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        time_range = self.ddim_timesteps[::-1]
        total = len(time_range)
        iterator = tqdm(time_range, desc=self.description, total=total, disable=not verbose)
        for i, step in enumerate(iterator):
            index = total - i - 1
            ts = torch.full((batch_size,), int(step), device=device, dtype=torch.long)
            x, pred_x0 = self.step(
                x,
                conditioning,
                ts,
                index,
                temperature=temperature,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning,
                generator=generator,
            )
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates

    def guided_model_output(
        self, x: torch.Tensor, t: torch.Tensor, c, scale: float, uc
    ) -> torch.Tensor:
        """Model output with classifier-free guidance, e_u + s (e_c - e_u), in one batched forward."""
        if uc is None or scale == 1.0:
            return self.model.apply_model(x, t, c).float()
        x_in = torch.cat([x] * 2)
        t_in = torch.cat([t] * 2)
        c_in = torch.cat([uc, c])
        out_uncond, out_cond = self.model.apply_model(x_in, t_in, c_in).float().chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    @torch.no_grad()
    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c,
        t: torch.Tensor,
        index: int,
        temperature: float = 1.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12), in float32."""
        model_output = self.guided_model_output(
            x, t, c, unconditional_guidance_scale, unconditional_conditioning
        )
        if self.model.parameterization == "v":
            e_t = self.model.predict_eps_from_z_and_v(x, t, model_output)
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, model_output)
        else:
            e_t = model_output
            a_t = self.ddim_alphas[index]
            pred_x0 = (x - self.ddim_sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        a_prev = self.ddim_alphas_prev[index]
        sigma_t = self.ddim_sigmas[index]
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t  # direction pointing to x_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if self.stochastic:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x_prev = x_prev + sigma_t * noise * temperature
        return x_prev, pred_x0

    description = "DDIM sampler"  # the progress bar's
    step = p_sample_ddim  # one step of `sample`: x_t -> (x_{t-1}, pred_x0)
