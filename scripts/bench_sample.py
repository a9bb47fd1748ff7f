"""Sampling speed: steps/s and seconds per image, with classifier-free guidance.

    python scripts/bench_sample.py [--config configs/stable-diffusion/v1-inference.yaml]
        [--ckpt FILE] [--H 512 --W 512] [--batch 1 [4 ...]] [--sampler ddim] [--steps 50]
        [--precision autocast] [--device cuda] [--compile] [--capture] [--runs 3]

Runs `ldm.sample.generate` (the txt2img path: text encoding, the sampler (DDIM or DPM-Solver++)
with one batched forward of [uncond, cond] per step, VAE decoding) once to warm up, then
`--runs` times timed, for each `--batch`. Steps/s covers the sampler's loop (from the end of its
first step to the end of its last);
s/image covers the whole of `generate`; peak GiB is the peak memory of those calls (CUDA
allocated, or the process's RSS on the CPU). `--capture` replays the guided UNet call from a
CUDA graph (unverified on a GPU; the plain sampler without CUDA). Without `--ckpt` the weights
are random, which does not change the speed. Prints a markdown table, one row per batch.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ldm.checkpoint import load_model_from_config
from ldm.config_files import read_config_file
from ldm.models.diffusion.captured import SAMPLERS
from ldm.sample import generate, prepare_for_sampling, seeded_noise
from ldm.train.logger import peak_memory_gb, reset_peak_memory
from ldm.util import default_precision, instantiate_from_config

VAE_FACTOR = 8  # pixels per latent, in every SD config
HEADER = (
    "| device | config | H x W | batch | sampler | steps | precision | compile | capture | steps/s "
    "| s/image | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


class StepTimer:
    """Wall time from the end of the first to the end of the last of `steps` DDIM steps, with the
    device synchronised at both ends (so the queued GPU work is counted). It is generate's step
    callback: a captured UNet call is a graph replay, which module hooks would not see."""

    def __init__(self, steps: int, device: torch.device):
        self.steps, self.device = steps, device
        self.start = self.end = 0.0

    def __call__(self, i: int) -> None:
        if i in (0, self.steps - 1) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if i == 0:
            self.start = time.perf_counter()
        if i == self.steps - 1:
            self.end = time.perf_counter()

    @property
    def steps_per_s(self) -> float:
        return (self.steps - 1) / (self.end - self.start)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = "CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, torch threads={torch.get_num_threads()}"


def build_model(opt: argparse.Namespace) -> torch.nn.Module:
    config = read_config_file(opt.config)
    if opt.ckpt:
        model = load_model_from_config(config, opt.ckpt)
    else:
        model = instantiate_from_config(config.model)
    model = prepare_for_sampling(model, opt.device, opt.precision)
    if opt.compile:
        # Only the UNet: the guided wrapper around it stays eager.
        model.model.diffusion_model.compile()
    return model


def bench(model: torch.nn.Module, opt: argparse.Namespace, batch: int) -> dict:
    """Steps/s and s/image (medians over the timed runs) and the peak memory, at `batch`."""
    device = torch.device(opt.device)
    prompts = ["a photo of sks dog in a bucket"] * batch
    x_T = seeded_noise(
        list(range(batch)), (model.channels, opt.H // VAE_FACTOR, opt.W // VAE_FACTOR)
    )
    steps_per_s, totals = [], []
    for run in range(opt.runs + 1):  # run 0 warms up (compiles, records the graphs)
        if run == 1:
            reset_peak_memory(device)
        timer = StepTimer(opt.steps, device)
        start = time.perf_counter()
        # .cpu(), as txt2img does: it waits for the device to finish.
        generate(
            model, prompts, x_T, opt.steps, scale=opt.scale, precision=opt.precision,
            capture=opt.capture, callback=timer, sampler=opt.sampler,
        ).cpu()  # fmt: skip
        total = time.perf_counter() - start
        if run > 0:
            steps_per_s.append(timer.steps_per_s)
            totals.append(total)
    return {
        "steps_per_s": statistics.median(steps_per_s),
        "s_per_image": statistics.median(totals) / batch,
        "peak_gb": peak_memory_gb(device),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--ckpt", help="weights to load (default: random weights)")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1],
        help="images per generate call (several: a row each)",
    )
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (at least 2)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale (1 = no guidance)")
    p.add_argument("--precision", choices=["full", "autocast", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--capture", action="store_true", help="the guided UNet call as a CUDA graph")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--no-header", action="store_true", help="print the row only")
    opt = p.parse_args(argv)
    opt.precision = opt.precision or default_precision(opt.device)
    if opt.H % 64 or opt.W % 64:
        p.error("--H and --W must be multiples of 64")
    if opt.steps < 2:
        p.error("--steps must be at least 2 (steps/s is timed from the end of the first)")
    return opt


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    try:
        model = build_model(opt)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{Path(__file__).name}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if not opt.no_header:
        print(HEADER)
    for batch in opt.batch:
        result = bench(model, opt, batch)
        row = [device_name(torch.device(opt.device)), Path(opt.config).stem, f"{opt.H} x {opt.W}"]
        row += [str(batch), opt.sampler, str(opt.steps), opt.precision]
        row += ["yes" if opt.compile else "no", "yes" if opt.capture else "no"]
        row += [f"{result['steps_per_s']:.2f}", f"{result['s_per_image']:.3f}"]
        row += [f"{result['peak_gb']:.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
