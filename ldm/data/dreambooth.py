"""DreamBooth training data: a few photos of one subject, and optionally prior-preservation images.

Each item pairs an instance image and its prompt ("a photo of sks dog") with, when a class folder is
given, a class image and its prompt ("a photo of dog"). As in diffusers' train_dreambooth, the length
is max(#instance, #class) and item i uses instance i % #instance and class i % #class.

With `captions=True` each instance image has its own prompt, read from a caption file beside it
(`00001.png` + `00001.txt`, kohya's convention): text-to-image training on a captioned set is
DreamBooth without the identifier and the prior term, and the same loop does both. Prompts are kept
once in `prompts`; images refer to them by index (`instance_prompt_ids`, `class_prompt_id`).

Augmentation (flip, random crop) is drawn from a generator seeded by (seed, epoch, index), never from
global RNG, so an item is a pure function of those three numbers: the same in every DataLoader worker
and on every rank, and the same again after resuming. The order of items is the sampler's business.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.images import DataError, check_image_folder, image_to_tensor, load_rgb, resize_crop

CAPTION_EXTENSION = ".txt"
# A caption is a sentence or a list of tags (CLIP reads 77 tokens of it); a longer file is not
# one, and reading it whole could take any amount of memory (a link to /dev/zero has no end).
MAX_CAPTION_BYTES = 65_536
DEFAULT_INSTANCE_TEMPLATE = "a photo of {token} {class}"
DEFAULT_CLASS_TEMPLATE = "a photo of {class}"
TEMPLATE_FIELDS = ("token", "class")


def format_prompt(template: str, token: str, class_word: str) -> str:
    """Fill `{token}` and `{class}` in a str.format template; any other field is a DataError."""
    try:
        fields = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as exc:  # unbalanced braces
        raise DataError(f"prompt template {template!r}", exc) from exc
    for field in fields:
        if field not in TEMPLATE_FIELDS:
            reason = f"unknown field {{{field}}}; a template may use only {{token}} and {{class}}"
            raise DataError(f"prompt template {template!r}", reason)
    # Runs of spaces folded: an empty class noun (the no-class ablation) leaves no gap.
    return " ".join(template.format(token=token, **{"class": class_word}).split())


def read_caption(image: Path) -> str:
    """The caption of `image`: its `.txt` sidecar, whitespace folded to single spaces."""
    path = image.with_suffix(CAPTION_EXTENSION)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except FileNotFoundError:
        raise DataError(image, f"no caption file {path.name} (data.captions is on)") from None
    except OSError as exc:
        raise DataError(path, exc) from exc
    if len(data) > MAX_CAPTION_BYTES:
        raise DataError(path, f"over {MAX_CAPTION_BYTES} bytes; a caption is a line of text")
    try:
        return " ".join(data.decode("utf-8").split())
    except UnicodeDecodeError as exc:
        raise DataError(path, exc) from exc


class ItemPlan(NamedTuple):
    """The choices behind one item: which images, flipped or not, and where cropped.

    A crop is None for the center crop, else (x, y) in [0, 1) as taken by `resize_crop`. The class
    fields are None / False when there is no class folder.
    """

    instance_index: int
    instance_flip: bool
    instance_crop: tuple[float, float] | None
    class_index: int | None
    class_flip: bool
    class_crop: tuple[float, float] | None


def _item_seed(seed: int, epoch: int, index: int) -> int:
    # SeedSequence mixes the three numbers well, so neighbouring indices or epochs get unrelated
    # streams (seed + index would make epoch e index i collide with epoch e+1 index i-1).
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


class DreamBoothDataset(Dataset):
    """Instance photos of one subject with their prompt, plus optional class (prior) photos.

    Items are dicts with "instance_image" (float [3, size, size] in [-1, 1]) and "instance_prompt",
    plus "class_image" and "class_prompt" when `class_root` is given. Every image in both folders is
    decoded once here, so unreadable data raises DataError before training starts.

    Call `set_epoch` before creating each epoch's DataLoader iterator; workers copy the dataset when
    the iterator starts, so do not use persistent_workers.
    """

    def __init__(
        self,
        instance_root: str | Path,
        token: str,
        class_word: str,
        size: int = 512,
        instance_template: str = DEFAULT_INSTANCE_TEMPLATE,
        class_root: str | Path | None = None,
        class_template: str = DEFAULT_CLASS_TEMPLATE,
        center_crop: bool = True,
        flip_p: float = 0.5,
        seed: int = 0,
        captions: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.size = size
        self.center_crop = center_crop
        self.flip_p = flip_p
        self.seed = seed
        self.epoch = 0
        # Templates first: a typo there should not wait for a thousand class images to decode.
        self.instance_prompt = (
            None if captions else format_prompt(instance_template, token, class_word)
        )
        self.class_prompt = (
            None if class_root is None else format_prompt(class_template, token, class_word)
        )
        self.instance_paths = check_image_folder(instance_root)
        self.class_paths = [] if class_root is None else check_image_folder(class_root)
        instance_prompts = (
            [read_caption(p) for p in self.instance_paths]
            if captions
            else [self.instance_prompt] * len(self.instance_paths)
        )
        # The empty prompt is always in the table: caption dropout (classifier-free guidance
        # training) replaces a prompt by it.
        self.prompts: list[str] = list(
            dict.fromkeys(["", *instance_prompts, self.class_prompt or ""])
        )
        row = {text: i for i, text in enumerate(self.prompts)}
        self.instance_prompt_ids = [row[text] for text in instance_prompts]
        self.class_prompt_id = row[self.class_prompt] if class_root is not None else None
        self.empty_prompt_id = row[""]

    @property
    def with_prior(self) -> bool:
        """Whether items carry a class image for the prior-preservation loss."""
        return self.class_prompt is not None

    def __len__(self) -> int:
        return max(len(self.instance_paths), len(self.class_paths))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws `__getitem__` returns."""
        self.epoch = epoch

    def plan(self, index: int) -> ItemPlan:
        """The images and augmentation of item `index` in the current epoch, without decoding."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        instance_flip, instance_crop = self._draw(generator)
        class_index, class_flip, class_crop = None, False, None
        if self.with_prior:
            class_index = index % len(self.class_paths)
            class_flip, class_crop = self._draw(generator)
        instance_index = index % len(self.instance_paths)
        return ItemPlan(
            instance_index, instance_flip, instance_crop, class_index, class_flip, class_crop
        )

    def _draw(self, generator: torch.Generator) -> tuple[bool, tuple[float, float] | None]:
        # Always draw all three numbers, so switching crop mode or flip_p leaves the rest of the
        # stream (e.g. the class image's draws) unchanged.
        flip_u, crop_x, crop_y = torch.rand(3, generator=generator).tolist()
        return flip_u < self.flip_p, None if self.center_crop else (crop_x, crop_y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        plan = self.plan(index)
        pixels = self.pixels(plan)
        item: dict[str, torch.Tensor | str] = {
            "instance_image": pixels["instance"],
            "instance_prompt": self.prompts[self.instance_prompt_ids[plan.instance_index]],
        }
        if "class" in pixels:
            item["class_image"] = pixels["class"]
            item["class_prompt"] = self.class_prompt
        return item

    def pixels(self, plan: ItemPlan) -> dict[str, torch.Tensor]:
        """The decoded, cropped and flipped images of a plan: {"instance": ..., "class": ...}."""
        instance_path = self.instance_paths[plan.instance_index]
        out = {"instance": self._pixels(instance_path, plan.instance_flip, plan.instance_crop)}
        if plan.class_index is not None:
            class_path = self.class_paths[plan.class_index]
            out["class"] = self._pixels(class_path, plan.class_flip, plan.class_crop)
        return out

    def _pixels(self, path: Path, flip: bool, crop: tuple[float, float] | None) -> torch.Tensor:
        pixels = image_to_tensor(resize_crop(load_rgb(path), self.size, crop))
        return pixels.flip(-1) if flip else pixels

    def instance_pixels(self, index: int, flip: bool) -> torch.Tensor:
        """Instance image `index` (of `instance_paths`), center-cropped, flipped or not.

        These are all the distinct instance inputs, which a latent cache can encode once. Random
        crop has no fixed pixels, so it rules out a latent cache and this raises ValueError.
        """
        return self._fixed_pixels(self.instance_paths, index, flip)

    def class_pixels(self, index: int, flip: bool) -> torch.Tensor:
        """Class image `index` (of `class_paths`), center-cropped, flipped or not; see instance_pixels."""
        return self._fixed_pixels(self.class_paths, index, flip)

    def _fixed_pixels(self, paths: list[Path], index: int, flip: bool) -> torch.Tensor:
        if not self.center_crop:
            raise ValueError("random crop (center_crop=False) gives no fixed pixels to cache")
        return self._pixels(paths[index], flip, None)


def collate(items: list[dict[str, torch.Tensor | str]]) -> dict[str, torch.Tensor | list[str]]:
    """Batch dataset items: "instance_images" [B, 3, H, W] and "instance_prompts" (list of str), and
    "class_images" / "class_prompts" likewise when the items carry class images."""
    batch: dict[str, torch.Tensor | list[str]] = {
        "instance_images": torch.stack([item["instance_image"] for item in items]),
        "instance_prompts": [item["instance_prompt"] for item in items],
    }
    if "class_image" in items[0]:
        batch["class_images"] = torch.stack([item["class_image"] for item in items])
        batch["class_prompts"] = [item["class_prompt"] for item in items]
    return batch
