"""Class (prior-preservation) images sampled from the frozen model before training.

If the class folder holds fewer than `num_class_images` images, the shortfall is sampled with DDIM
and guidance (in batches; the same index sampled in another batch may differ by a rounding step). Image i is named `prior_{i:05d}.png` and drawn from seed `seed + i`, so an
interrupted run resumes where it stopped and a rerun writes the same files; ranks split the work.
Each file is written to a temporary name and renamed, so a half-written PNG is never counted.
"""

from pathlib import Path

from tqdm import tqdm

from ldm.data.images import list_images
from ldm.models.diffusion.captured import release_graphs
from ldm.sample import generate, save_png, seeded_noise, to_pil


def missing_indices(class_root: Path, num_class_images: int) -> list[int]:
    """Indices of the `prior_*.png` files still to sample, fewest first."""
    existing = len(list_images(class_root)) if class_root.is_dir() else 0
    shortfall = num_class_images - existing
    if shortfall <= 0:
        return []
    free = [i for i in range(num_class_images) if not (class_root / f"prior_{i:05d}.png").exists()]
    return free[:shortfall]


def sample_class_images(
    model,
    class_root: str | Path,
    class_prompt: str,
    prior_cfg,
    size: int,
    precision: str,
    indices: list[int],
    progress: bool = True,
    should_stop=lambda: False,
    capture: bool = False,
) -> int:
    """Sample `prior_{i:05d}.png` for each index (from `missing_indices`, or this rank's share
    of them: every rank lists the folder before any rank writes); returns how many it wrote.
    `should_stop()` is asked before each batch: true ends the sampling early (a stop signal).
    `capture`: the guided UNet call replays a CUDA graph (freed when the sampling ends)."""
    class_root = Path(class_root)
    class_root.mkdir(parents=True, exist_ok=True)
    todo = list(indices)
    shape = model.latent_shape(size, size)
    batches = [
        todo[i : i + prior_cfg.batch_size] for i in range(0, len(todo), prior_cfg.batch_size)
    ]
    bar = tqdm(
        total=len(todo), desc=f"class images ({class_prompt!r})", disable=not progress or not todo
    )
    wrote = 0
    for indices in batches:
        if should_stop():
            break
        images = generate(
            model,
            [class_prompt] * len(indices),
            seeded_noise([prior_cfg.seed + i for i in indices], shape),
            ddim_steps=prior_cfg.ddim_steps,
            sampler=prior_cfg.sampler,
            scale=prior_cfg.scale,
            negative_prompt=prior_cfg.negative_prompt,
            precision=precision,
            capture=capture,
        )
        for i, image in zip(indices, to_pil(images)):
            save_png(image, class_root / f"prior_{i:05d}.png")
        bar.update(len(indices))
        wrote += len(indices)
    bar.close()
    release_graphs(model)
    return wrote
