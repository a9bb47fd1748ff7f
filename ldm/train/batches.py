"""Training examples keyed by their global position in the run.

Micro-batch k of the run holds the global positions [k*G, (k+1)*G) with G = processes x batch
size, and rank r takes the contiguous slice [k*G + r*B, k*G + (r+1)*B). A position maps to a dataset
item through a fresh permutation per epoch, and its timestep, diffusion noise and VAE posterior
noise come from a generator keyed by (seed, position). So a sample is the same whichever rank or
batch it lands in (two processes of batch B equal one of batch 2B), and resuming at a step
replays exactly what an uninterrupted run would have drawn.
"""

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ldm.data.dreambooth import DreamBoothDataset
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import keyed_seed

KINDS = ("instance", "class")


class PositionSampler(Sampler):
    """Endless global positions of one rank, starting at micro-batch `start`."""

    def __init__(self, rank: int, world_size: int, batch_size: int, start: int = 0):
        self.rank, self.world_size, self.batch_size, self.start = (
            rank,
            world_size,
            batch_size,
            start,
        )

    def __iter__(self) -> Iterator[int]:
        micro = self.start
        stride = self.world_size * self.batch_size
        while True:
            first = micro * stride + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)
            micro += 1


class LatentCache:
    """VAE moments [N, 2 flips, 2C, h, w] of every center-cropped instance and class image, so the
    VAE runs once; each step still samples the posterior with that sample's own noise.
    `should_stop()` is asked before each batch: true stops the encoding (`self.complete` False)."""

    def __init__(
        self,
        model,
        dataset: DreamBoothDataset,
        device: torch.device,
        batch_size: int = 8,
        should_stop=lambda: False,
    ):
        flips = (False, True) if dataset.flip_p > 0 else (False,)
        parts = [("instance", dataset.instance_pixels, len(dataset.instance_paths))]
        if dataset.with_prior:
            parts.append(("klass", dataset.class_pixels, len(dataset.class_paths)))
        self.instance = self.klass = None
        self.complete = False
        for name, pixels, count in parts:
            table = self._encode(model, pixels, count, flips, device, batch_size, should_stop)
            if table is None:
                return
            setattr(self, name, table)
        self.complete = True

    @staticmethod
    @torch.no_grad()
    def _encode(model, pixels, count: int, flips, device, batch_size: int, should_stop):
        keys = [(i, f) for i in range(count) for f in flips]
        moments = []
        dtype = next(model.first_stage_model.parameters()).dtype
        for start in range(0, len(keys), batch_size):
            if should_stop():
                return None
            x = torch.stack([pixels(i, f) for i, f in keys[start : start + batch_size]])
            posterior = model.encode_first_stage(x.to(device=device, dtype=dtype))
            moments.append(posterior.parameters.float().cpu())
        # [N * flips, 2C, h, w] -> [N, flips, 2C, h, w]
        return torch.cat(moments).view(count, len(flips), *moments[0].shape[1:])

    def moments(self, kind: str, index: int, flip: bool) -> torch.Tensor:
        table = self.instance if kind == "instance" else self.klass
        return table[index, int(flip) if table.shape[1] == 2 else 0]


class PositionDataset(Dataset):
    """Global position -> one training example: pixels (or cached VAE moments) of the instance and
    class image, with each part's timestep `t`, noise, posterior noise `eps` and `prompt` id."""

    def __init__(
        self,
        dataset: DreamBoothDataset,
        seed: int,
        latent_shape: tuple[int, int, int],
        num_timesteps: int,
        cache: LatentCache | None = None,
        caption_dropout: float = 0.0,
        noise_offset: float = 0.0,
    ):
        self.dataset, self.seed, self.cache = dataset, seed, cache
        self.caption_dropout, self.noise_offset = caption_dropout, noise_offset
        self.latent_shape, self.num_timesteps = latent_shape, num_timesteps
        self.kinds = KINDS if dataset.with_prior else KINDS[:1]
        self._order: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:  # positions are unbounded; the sampler decides
        return 2**62

    def _index(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, len(self.dataset))
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(keyed_seed(self.seed, "epoch", epoch))
            self._order = (epoch, torch.randperm(len(self.dataset), generator=generator).tolist())
        return epoch, self._order[1][offset]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        epoch, index = self._index(position)
        self.dataset.set_epoch(epoch)
        plan = self.dataset.plan(index)
        images = {"instance": (plan.instance_index, plan.instance_flip)}
        if "class" in self.kinds:
            images["class"] = (plan.class_index, plan.class_flip)
        item = {}
        if self.cache is None:
            for kind, pixels in self.dataset.pixels(plan).items():
                item[f"{kind}_pixels"] = pixels
        else:
            for kind, (image, flip) in images.items():
                item[f"{kind}_moments"] = self.cache.moments(kind, image, flip)
        for kind, (image, _) in images.items():
            generator = torch.Generator().manual_seed(keyed_seed(self.seed, position, kind))
            item[f"{kind}_t"] = torch.randint(0, self.num_timesteps, (), generator=generator)
            item[f"{kind}_noise"] = torch.randn(self.latent_shape, generator=generator)
            item[f"{kind}_eps"] = torch.randn(self.latent_shape, generator=generator)
            if self.noise_offset:  # drawn last: without it the other draws are unchanged
                offset = torch.randn(self.latent_shape[0], 1, 1, generator=generator)
                item[f"{kind}_noise"] += self.noise_offset * offset
            item[f"{kind}_prompt"] = torch.tensor(self._prompt_id(kind, image, position))
        return item

    def _prompt_id(self, kind: str, image: int, position: int) -> int:
        """The example's prompt (an index into `dataset.prompts`), or the empty prompt with
        probability `caption_dropout`, so the model also learns the unconditional prediction
        that classifier-free guidance needs."""
        d = self.dataset
        prompt = d.instance_prompt_ids[image] if kind == "instance" else d.class_prompt_id
        if self.caption_dropout > 0:
            generator = torch.Generator().manual_seed(
                keyed_seed(self.seed, position, kind, "caption")
            )
            if torch.rand((), generator=generator) < self.caption_dropout:
                return d.empty_prompt_id
        return prompt


def stack_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


@torch.no_grad()
def latents_of(model, batch: dict[str, torch.Tensor], kinds, device: torch.device) -> torch.Tensor:
    """Scaled latents [sum over kinds of B, C, h, w], instance first: a posterior sample with the
    batch's own noise, from cached moments or by running the frozen VAE."""
    dtype = next(model.first_stage_model.parameters()).dtype
    latents = []
    for kind in kinds:
        if f"{kind}_moments" in batch:
            moments = batch[f"{kind}_moments"].to(device)
        else:
            pixels = batch[f"{kind}_pixels"].to(device=device, dtype=dtype)
            moments = model.encode_first_stage(pixels).parameters.float()
        # Both paths sample from float32 moments, so caching changes nothing but the cost.
        posterior = DiagonalGaussianDistribution(moments)
        eps = batch[f"{kind}_eps"].to(device)
        latents.append(model.scale_factor * posterior.sample(noise=eps))
    return torch.cat(latents)


def concat(batch: dict[str, torch.Tensor], name: str, kinds, device: torch.device) -> torch.Tensor:
    """Instance and class parts of one field as one batch, instance first."""
    return torch.cat([batch[f"{kind}_{name}"] for kind in kinds]).to(device)
