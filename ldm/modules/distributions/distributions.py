"""The VAE's posterior: a diagonal Gaussian over latents."""

import torch


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from encoder moments [B, 2C, h, w] split along channels."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # Clamped as in CompVis so exp() stays finite for untrained or half-precision moments.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.zeros_like(self.mean) if deterministic else torch.exp(0.5 * self.logvar)
        self.var = self.std**2

    def sample(
        self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A reparameterised sample mean + std * noise [B, C, h, w]; `noise` may be given so
        that the same draw can be replayed (training keys it by sample position)."""
        if noise is None:
            noise = torch.randn(
                self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        return self.mean + self.std * noise.to(self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean
