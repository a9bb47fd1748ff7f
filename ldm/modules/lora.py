"""Low-rank adapters as weights: W' = W + multiplier * (alpha / rank) * up @ down (Hu et al. 2021,
eq. 3, with kohya's alpha scaling), for linear layers and convolutions.

An adapter is named by the SD weight it changes. `rows` places it on a block of that weight's
rows: SD v2's OpenCLIP fuses q, k and v into one `in_proj_weight`, where LoRA files (written for
the diffusers/transformers form) adapt q, k and v separately.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass(frozen=True)
class Adapter:
    key: str  # the SD weight it adapts, e.g. model.diffusion_model.<...>.attn1.to_q.weight
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float
    rows: tuple[int, int] | None = None  # (block, blocks) of the weight's rows

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(alpha / rank) * up @ down in float32, shaped like the (block of the) weight."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 4:  # a convolution: a k x k down projection, then a 1 x 1 up one
            delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        else:
            delta = up.flatten(1) @ down.flatten(1)
        if self.rows is not None:
            block, blocks = self.rows
            shape = (shape[0] // blocks, *shape[1:])
        if delta.numel() != torch.Size(shape).numel():
            raise ValueError(
                f"{self.key}: adapter of shape {tuple(delta.shape)} for {tuple(shape)}"
            )
        return delta.reshape(shape) * (self.alpha / self.rank)


def adapter_state(adapters: Iterable[Adapter]) -> dict[str, torch.Tensor]:
    """Adapters as tensors named `<SD module>.lora_down.weight`, `.lora_up.weight`, `.alpha`:
    the kohya suffixes on CompVis names (how training checkpoints store them)."""
    state = {}
    for a in adapters:
        module = a.key.removesuffix(".weight")
        state[f"{module}.lora_down.weight"] = a.down
        state[f"{module}.lora_up.weight"] = a.up
        state[f"{module}.alpha"] = torch.tensor(float(a.alpha))
    return state


def adapters_of_state(state: Mapping[str, torch.Tensor]) -> list[Adapter]:
    """The inverse of `adapter_state`."""
    modules = sorted(
        {k.removesuffix(".lora_down.weight") for k in state if k.endswith(".lora_down.weight")}
    )
    return [
        Adapter(
            f"{m}.weight",
            state[f"{m}.lora_down.weight"],
            state[f"{m}.lora_up.weight"],
            float(state[f"{m}.alpha"]),
        )
        for m in modules
    ]


@torch.no_grad()
def merge(
    weights: Mapping[str, torch.Tensor], adapters: Iterable[Adapter], multiplier: float = 1.0
) -> None:
    """Add the adapters into `weights` (SD key -> tensor, changed in place, in its own dtype;
    the sum is formed in float32)."""
    for a in adapters:
        weight = weights[a.key]
        target = weight
        if a.rows is not None:
            block, blocks = a.rows
            target = weight.chunk(blocks, dim=0)[block]
        target.copy_(target.float() + multiplier * a.delta(tuple(weight.shape)))
