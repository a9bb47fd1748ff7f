"""AutoencoderKL: the f=8 VAE that maps images to Stable Diffusion's latent space."""

import inspect

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """encode(x [B, 3, H, W] in [-1, 1]) -> posterior over [B, embed_dim, H/8, W/8]; decode(z) -> x.

    Inference only: this project never trains the VAE, so `lossconfig`, `monitor`, `image_key`
    and the other Lightning-era arguments are accepted for CompVis config compatibility and unused.
    """

    def __init__(
        self,
        ddconfig: dict,
        lossconfig: dict | None = None,
        embed_dim: int = 4,
        ckpt_path: str | None = None,
        ignore_keys=(),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ):
        super().__init__()
        if ckpt_path is not None:
            raise ValueError(
                "AutoencoderKL(ckpt_path=...) is not supported: load weights with "
                "ldm.checkpoint.load_model_from_config"
            )
        known = set(inspect.signature(Encoder).parameters) | set(
            inspect.signature(Decoder).parameters
        )
        unknown = sorted(set(ddconfig) - known)
        if unknown:
            raise ValueError(
                f"AutoencoderKL ddconfig: unknown keys {unknown} (known: {sorted(known)})"
            )
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (self.encoder.num_resolutions - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z)
