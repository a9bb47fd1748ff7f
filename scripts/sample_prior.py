"""Sample class (prior-preservation) images from a frozen Stable Diffusion model.

    python scripts/sample_prior.py --ckpt sd-v1-5.ckpt --class_word dog --outdir class_images/dog \
        --num 200 --batch_size 4

The same code main.py runs before training when the class folder is short: images already in the
folder count towards --num, image i is `prior_{i:05d}.png` from seed --seed + i, so an interrupted
run resumes and a rerun writes the same files. `torchrun --nproc_per_node N scripts/...` splits
the work across GPUs.
"""

import argparse
import sys
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, load_model_from_config
from ldm.config_files import read_config_file
from ldm.data.dreambooth import DEFAULT_CLASS_TEMPLATE, format_prompt
from ldm.models.diffusion.captured import SAMPLERS
from ldm.sample import prepare_for_sampling
from ldm.train import distributed
from ldm.train.config import PriorConfig
from ldm.train.prior import missing_indices, sample_class_images
from ldm.util import default_precision


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--ckpt", required=True, help="base weights (.ckpt / .safetensors)")
    p.add_argument("--use_ema", action="store_true", help="take the model_ema.* UNet weights")
    p.add_argument(
        "--unsafe_load",
        action="store_true",
        help="trust the files: arbitrary unpickling, any config target",
    )
    p.add_argument("--class_word", required=True, help="the class noun, e.g. dog")
    p.add_argument("--template", default=DEFAULT_CLASS_TEMPLATE, help="prompt with {class}")
    p.add_argument("--outdir", required=True, help="the class folder to fill")
    p.add_argument("--num", type=int, default=200, help="images the folder should hold")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (UNet calls)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument(
        "--precision", default=None, help="32, bf16 or autocast (default: autocast on CUDA)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument(
        "--capture", action="store_true", help="the guided UNet call as a CUDA graph (unverified)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        env = distributed.setup(args.device)
        precision = args.precision or default_precision(env.device)
        model = load_model_from_config(
            read_config_file(args.config), args.ckpt, args.use_ema, args.unsafe_load
        )
        model = prepare_for_sampling(model, env.device, precision)
        prior = PriorConfig(
            num_class_images=args.num,
            batch_size=args.batch_size,
            sampler=args.sampler,
            ddim_steps=args.steps,
            scale=args.scale,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
        )
        todo = missing_indices(Path(args.outdir), args.num)
        distributed.barrier(env)  # every rank has listed the folder before any rank writes
        class_prompt = format_prompt(args.template, "", args.class_word)
        wrote = sample_class_images(
            model, args.outdir, class_prompt, prior, args.size, precision,
            todo[env.rank :: env.world_size], progress=env.is_main, capture=args.capture,
        )  # fmt: skip
        distributed.barrier(env)
        if env.is_main:
            print(f"{args.outdir}: {len(todo)} sampled ({wrote} by rank 0), {args.num} wanted")
    except (ValueError, CheckpointError, torch.cuda.OutOfMemoryError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
