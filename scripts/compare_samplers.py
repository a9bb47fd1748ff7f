r"""How close each sampler gets to the converged solution of the sampling ODE, by step count.

    python scripts/compare_samplers.py                       # the toy world's base, 24 prompts
    python scripts/compare_samplers.py --config configs/stable-diffusion/v1-inference.yaml \
        --ckpt sd-v1-5.ckpt --size 512 --prompt "a photo of a dog" --n 4 --steps 20 25 50

The same start noise and prompts go through DDIM and DPM-Solver++(2M) at each `--steps`, and
through DPM-Solver++ at `--reference` steps (the converged solution: start at T - 1, end at
sigma = 0). A row gives the RMS distance of the decoded images from the reference's (pixels in
[0, 1]) and the CPU seconds of the sampling. DDIM's grid starts a little below T - 1 and ends at
alphas_cumprod[0], not at sigma = 0 (CompVis's DDIM), so its distance also holds those offsets:
it bounds DDIM's error from above. README, "Samplers", has the toy world's table.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.checkpoint import load_model_from_config  # noqa: E402
from ldm.config_files import read_config_file  # noqa: E402
from ldm.data import toyworld as tw  # noqa: E402
from ldm.eval import toy  # noqa: E402
from ldm.models.diffusion.captured import SAMPLERS  # noqa: E402
from ldm.sample import generate, seeded_noise  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(toy.BASE_CONFIG))
    p.add_argument("--ckpt", default=str(toy.BASE_WEIGHTS))
    p.add_argument("--size", type=int, default=tw.SIZE, help="image side in pixels")
    p.add_argument("--prompt", action="append", help="default: the toy world's ordinary prompts")
    p.add_argument("--n", type=int, default=24, help="images (prompts are cycled)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 50, 100])
    p.add_argument("--reference", type=int, default=500, help="DPM-Solver++ steps")
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    try:
        model = load_model_from_config(read_config_file(opt.config), opt.ckpt).eval()
    except (ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        raise SystemExit(f"{Path(__file__).name}: error: {e}") from None
    texts = opt.prompt or [p.text for p in toy.base_prompts(0, opt.n)]
    prompts = [texts[i % len(texts)] for i in range(opt.n)]
    x_T = seeded_noise(list(range(opt.n)), model.latent_shape(opt.size, opt.size))

    def run(sampler: str, steps: int) -> tuple[torch.Tensor, float]:
        start = time.process_time()
        images = generate(model, prompts, x_T, steps, opt.scale, precision="full", sampler=sampler)
        return images, time.process_time() - start

    reference, _ = run("dpmpp_2m", opt.reference)
    print(f"| sampler | steps | RMS from dpmpp_2m x {opt.reference} | CPU s |\n|---|---|---|---|")
    for steps in opt.steps:
        for sampler in SAMPLERS:
            images, seconds = run(sampler, steps)
            rms = (images - reference).pow(2).mean().sqrt().item()
            print(f"| {sampler} | {steps} | {rms:.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
