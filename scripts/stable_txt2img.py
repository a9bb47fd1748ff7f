"""Text-to-image from a Stable Diffusion checkpoint, with CompVis's `scripts/txt2img.py` flags.

    python scripts/stable_txt2img.py --ckpt sd-v1-4.ckpt --prompt "a photo of sks dog"

Writes `OUTDIR/samples/NNNNN.png` (numbering continues after the files already there) and one
`OUTDIR/grid-NNNN.png` per run. Image k of a run starts from the noise of seed `--seed + k`, so a
seed gives the same images on every machine, and one image of a batch can be redone on its own
with `--seed SEED+k --n_samples 1 --n_iter 1`.
"""

import argparse
import re
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torchvision.utils import make_grid
from tqdm import tqdm, trange

from ldm.checkpoint import load_model_from_config
from ldm.config_files import read_config_file
from ldm.formats.kohya import apply_lora_files
from ldm.models.diffusion.captured import SAMPLERS
from ldm.sample import generate, prepare_for_sampling, save_png, seeded_noise, to_pil
from ldm.util import default_precision, size_multiple

# The DDIM step noise (eta > 0) gets its own seed stream, apart from the start codes' seed + k.
STEP_NOISE_SEED_OFFSET = 1 << 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", help="a text file with one prompt per line")
    p.add_argument("--negative_prompt", default="", help="the guidance's unconditional prompt")
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument(
        "--ckpt",
        required=True,
        help="a .ckpt or .safetensors in the SD layout, or a diffusers folder",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="a LoRA file in the kohya/webui layout, merged with WEIGHT (default 1); repeatable",
    )
    p.add_argument("--use_ema", action="store_true", help="take the model_ema.* UNet weights")
    p.add_argument(
        "--unsafe_load",
        action="store_true",
        help="trust the files: arbitrary unpickling, any config target",
    )
    p.add_argument("--outdir", default="outputs/txt2img-samples")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--ddim_steps", type=int, default=50, help="sampler steps (UNet calls)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM's step noise (ddim only)")
    p.add_argument("--n_iter", type=int, default=2, help="sampling rounds")
    p.add_argument("--n_samples", type=int, default=3, help="batch size")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default n_samples)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--H", type=int, default=512, help="image height in pixels")
    p.add_argument("--W", type=int, default=512, help="image width in pixels")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="VAE downsampling factor")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--precision",
        choices=["full", "autocast", "fp16", "bf16"],
        help="default: autocast (fp16) on CUDA, full on CPU",
    )
    p.add_argument(
        "--fixed_code", action="store_true", help="every round reuses the first round's start codes"
    )
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--skip_save", action="store_true", help="write the grid only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--capture", action="store_true", help="the guided UNet call as a CUDA graph (unverified)"
    )
    opt = p.parse_args(argv)
    opt.n_rows = opt.n_rows or opt.n_samples
    opt.precision = opt.precision or default_precision(opt.device)
    return opt


def load_config(path: str) -> DictConfig:
    """The `model` section of a YAML config; anything unusable is a ValueError naming the file."""
    if not Path(path).is_file():
        raise ValueError(f"--config {path}: no such file")
    config = read_config_file(path)  # bounded, no interpolations: ConfigError naming the file
    if not isinstance(config.get("model"), DictConfig):
        raise ValueError(f"--config {path}: not a model config (no 'model' section)")
    return config.model


def check_options(opt: argparse.Namespace, config: DictConfig) -> None:
    """Reject sizes and settings the model cannot run, before the (slow) load."""
    try:
        unet = config.params.unet_config.params
        in_channels, _ = unet.in_channels, unet.channel_mult
        vae_levels = len(config.params.first_stage_config.params.ddconfig.ch_mult)
    except OmegaConfBaseException as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(
            f"--config {opt.config}: not a Stable Diffusion config ({reason})"
        ) from None
    if opt.C != in_channels:
        raise ValueError(f"--C {opt.C}: the config's UNet takes {in_channels} channels")
    if opt.f != 2 ** (vae_levels - 1):
        raise ValueError(f"--f {opt.f}: the config's VAE downsamples by {2 ** (vae_levels - 1)}")
    multiple = size_multiple(config)
    for flag in ("H", "W"):
        size = getattr(opt, flag)
        if size <= 0 or size % multiple:
            raise ValueError(
                f"--{flag} {size}: must be a positive multiple of {multiple} for this config"
            )
    for flag in ("n_iter", "n_samples", "ddim_steps"):
        if getattr(opt, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1")
    if opt.ddim_eta and opt.sampler != "ddim":
        raise ValueError(f"--ddim_eta {opt.ddim_eta}: {opt.sampler} is deterministic (use ddim)")
    timesteps = config.params.get("timesteps", 1000)
    if opt.ddim_steps > timesteps:
        raise ValueError(f"--ddim_steps {opt.ddim_steps}: the model has {timesteps} timesteps")
    if Path(opt.outdir).exists() and not Path(opt.outdir).is_dir():
        raise ValueError(f"--outdir {opt.outdir}: exists and is not a folder")
    device = torch.device(opt.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {opt.device}: CUDA is not available")
    if device.type == "cpu" and opt.precision in ("autocast", "fp16"):
        raise ValueError(f"--precision {opt.precision} needs CUDA; on CPU use full or bf16")


def prompt_batches(opt: argparse.Namespace) -> list[list[str]]:
    """One batch of n_samples copies of --prompt, or the --from-file lines in batches."""
    if not opt.from_file:
        return [[opt.prompt] * opt.n_samples]
    try:
        lines = Path(opt.from_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--from-file {opt.from_file}: cannot be read ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--from-file {opt.from_file}: has no prompts")
    return [prompts[i : i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]


def load_model(opt: argparse.Namespace, config: DictConfig) -> torch.nn.Module:
    model = load_model_from_config(
        {"model": config}, opt.ckpt, use_ema=opt.use_ema, unsafe_load=opt.unsafe_load
    )
    apply_lora_files(model.state_dict(), config, opt.lora)  # merged in float32, before any cast
    return prepare_for_sampling(model, opt.device, opt.precision)


def next_index(folder: Path, pattern: str) -> int:
    """One past the highest number among the files named like `pattern` (a regex with a group)."""
    numbers = [int(m.group(1)) for p in folder.glob("*") if (m := re.fullmatch(pattern, p.name))]
    return max(numbers, default=-1) + 1


def sample_all(
    model: torch.nn.Module, batches: list[list[str]], opt: argparse.Namespace
) -> list[torch.Tensor]:
    """Run n_iter rounds over the prompt batches, saving each image as it comes."""
    sample_dir = Path(opt.outdir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    count = next_index(sample_dir, r"(\d+)\.png")
    shape = (opt.C, opt.H // opt.f, opt.W // opt.f)
    per_round = sum(len(b) for b in batches)
    all_images = []
    for round_ in trange(opt.n_iter, desc="Sampling"):
        offset = 0
        for prompts in tqdm(batches, desc="data", disable=len(batches) == 1):
            k = round_ * per_round + offset  # the run-wide index of the batch's first image
            code_k = offset if opt.fixed_code else k
            x_T = seeded_noise([opt.seed + code_k + i for i in range(len(prompts))], shape)
            generator = torch.Generator().manual_seed(opt.seed + k + STEP_NOISE_SEED_OFFSET)
            images = generate(
                model,
                prompts,
                x_T,
                ddim_steps=opt.ddim_steps,
                sampler=opt.sampler,
                scale=opt.scale,
                eta=opt.ddim_eta,
                negative_prompt=opt.negative_prompt,
                precision=opt.precision,
                generator=generator,
                verbose=True,
                capture=opt.capture,
            ).cpu()
            if not opt.skip_save:
                for image in to_pil(images):
                    save_png(image, sample_dir / f"{count:05}.png")
                    count += 1
            if not opt.skip_grid:
                all_images.append(images)
            offset += len(prompts)
    return all_images


def save_grid(all_images: list[torch.Tensor], opt: argparse.Namespace) -> None:
    outdir = Path(opt.outdir)
    number = next_index(outdir, r"grid-(\d+)\.png")
    grid = make_grid(torch.cat(all_images), nrow=opt.n_rows)  # nrow: images per row
    save_png(to_pil(grid[None])[0], outdir / f"grid-{number:04}.png")


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    try:
        config = load_config(opt.config)
        check_options(opt, config)
        batches = prompt_batches(opt)
        model = load_model(opt, config)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{Path(__file__).name}: error: {e}", file=sys.stderr)
        return 1
    all_images = sample_all(model, batches, opt)
    if not opt.skip_grid:
        save_grid(all_images, opt)
    print(f"Samples written to {opt.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
