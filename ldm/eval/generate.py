"""Evaluation images: N images per prompt from fixed seeds, written with an index, resumable.

Image j of prompt i of a set (e.g. "subject", "class") starts from the noise of seed
`keyed_seed(seed, set, i, j)`, a pure function of those numbers, so any image can be regenerated on
its own and a resumed run makes the images an uninterrupted one would have. Every written image
gets a line in `index.jsonl` (file, prompt, seed, sampling settings, checkpoint); on a rerun, an
image that is on disk with an index line of the same prompt, seed and settings (weights
included) is kept, and the rest is generated, so a folder never mixes images of two settings.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ldm.data.images import load_rgb
from ldm.sample import generate, save_png, seeded_noise, to_pil
from ldm.util import keyed_seed, open_append

INDEX = "index.jsonl"


@dataclass(frozen=True)
class SamplingSettings:
    """Everything besides prompt and seed that decides an image; recorded per image."""

    ddim_steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    negative_prompt: str = ""
    precision: str = "full"
    height: int = 512
    width: int = 512
    weights: str = ""  # identifies the weights the caller loaded (see `weights_id`)


@dataclass(frozen=True)
class ImageSpec:
    file: str  # relative to the output folder
    prompt: str
    seed: int


def plan_images(name: str, prompts: Sequence[str], n_per_prompt: int, seed: int) -> list[ImageSpec]:
    """`n_per_prompt` images of each prompt, as files `name/{i:03d}_{j:03d}.png`."""
    return [
        ImageSpec(f"{name}/{i:03d}_{j:03d}.png", prompt, keyed_seed(seed, name, i, j))
        for i, prompt in enumerate(prompts)
        for j in range(n_per_prompt)
    ]


def read_index(outdir: str | Path) -> dict[str, dict]:
    """The newest index record of each file. A torn last line (a write cut short) is skipped:
    its image is simply generated again."""
    path = Path(outdir) / INDEX
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["file"]] = record
    return records


def weights_id(checkpoint: str | Path, use_ema: bool = False) -> str:
    """The checkpoint file as it is now (name, size, modification time) and the weights taken
    from it: a run trained on, or another file in its place, makes its images stale."""
    stat = Path(checkpoint).stat()
    ema = ", EMA weights" if use_ema else ""
    return f"{Path(checkpoint).name}, {stat.st_size} bytes, modified {stat.st_mtime_ns} ns{ema}"


def missing(
    outdir: str | Path, specs: Sequence[ImageSpec], settings: SamplingSettings
) -> list[ImageSpec]:
    """The specs without an image made with this prompt, seed and settings."""
    outdir = Path(outdir)
    records = read_index(outdir)

    def done(spec: ImageSpec) -> bool:
        record = records.get(spec.file)
        return (
            record is not None
            and (record["prompt"], record["seed"]) == (spec.prompt, spec.seed)
            and record["settings"] == asdict(settings)
            and (outdir / spec.file).is_file()
        )

    return [spec for spec in specs if not done(spec)]


def generate_images(
    model,
    outdir: str | Path,
    specs: Sequence[ImageSpec],
    settings: SamplingSettings,
    batch_size: int = 8,
    checkpoint: str = "",
    progress: bool = True,
) -> int:
    """Generate the specs' missing images into `outdir` (batches may mix prompts) and index
    them; returns how many were generated. `model` is ready to sample (`prepare_for_sampling`).

    With eta > 0 the DDIM step noise comes from one generator per batch (seeded by its first
    image): an image regenerated in another batch keeps its start noise but not its step noise.
    """
    outdir = Path(outdir)
    todo = missing(outdir, specs, settings)
    if not todo:
        return 0
    shape = model.latent_shape(settings.height, settings.width)
    outdir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"generating into {outdir}", disable=not progress)
    with open_append(outdir / INDEX) as index:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = generate(
                model,
                [spec.prompt for spec in batch],
                seeded_noise([spec.seed for spec in batch], shape),
                ddim_steps=settings.ddim_steps,
                scale=settings.scale,
                eta=settings.eta,
                negative_prompt=settings.negative_prompt,
                precision=settings.precision,
                generator=torch.Generator().manual_seed(keyed_seed(batch[0].seed, "eta")),
            )
            for spec, image in zip(batch, to_pil(images)):
                save_png(image, outdir / spec.file)
                record = {**asdict(spec), "settings": asdict(settings), "checkpoint": checkpoint}
                index.write(json.dumps(record) + "\n")
            index.flush()
            bar.update(len(batch))
    bar.close()
    return len(todo)


def load_generated(outdir: str | Path, specs: Sequence[ImageSpec]) -> list[tuple[Image.Image, str]]:
    """(image, prompt) of each spec, read back from `outdir`."""
    return [(load_rgb(Path(outdir) / spec.file), spec.prompt) for spec in specs]
