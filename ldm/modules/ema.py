"""Exponential moving average of weights, with LitEma's buffer names (`model_ema.*` in SD files)."""

import torch
import torch.nn as nn


class LitEma(nn.Module):
    """EMA of the trainable parameters of `model`, stored as buffers named by removing the dots
    (`diffusion_model.input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`), which
    is how "full-ema" Stable Diffusion checkpoints name them."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        # -1 disables the warm-up of the decay (CompVis semantics).
        self.use_num_updates = use_num_upates
        num_updates = 0 if use_num_upates else -1
        self.register_buffer("num_updates", torch.tensor(num_updates, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone().float())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One update: shadow -= (1 - decay) * (shadow - param). Stays on the device (no sync)."""
        decay = self.decay
        if self.use_num_updates:
            self.num_updates += 1
            # Warm-up: early updates follow the weights closely (CompVis).
            n = self.num_updates.float()
            decay = torch.minimum(decay, (1 + n) / (10 + n))
        weight = 1.0 - decay
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            s_name = self.m_name2s_name.get(name)
            if s_name is not None:
                shadow = shadows[s_name]
                shadow.lerp_(p.detach().to(shadow.dtype), weight)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model`."""
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            s_name = self.m_name2s_name.get(name)
            if s_name is not None:
                p.copy_(shadows[s_name])

    def store(self, parameters) -> None:
        """Save the current parameters, to be put back by `restore` after sampling with EMA."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for c_param, param in zip(self.collected_params, parameters, strict=True):
            param.copy_(c_param)
        self.collected_params = []
