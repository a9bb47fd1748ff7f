"""Sampling speed: DDIM steps/s and seconds per image, with classifier-free guidance.

    python scripts/bench_sample.py [--config configs/stable-diffusion/v1-inference.yaml]
        [--ckpt FILE] [--H 512 --W 512] [--batch 1] [--steps 50] [--precision autocast]
        [--device cuda] [--compile] [--runs 3]

Runs `ldm.sample.generate` (the txt2img path: text encoding, DDIM with one batched forward of
[uncond, cond] per step, VAE decoding) once to warm up, then `--runs` times timed. Steps/s covers
the DDIM loop only (first to last UNet call); s/image covers the whole of `generate`. Without
`--ckpt` the weights are random, which does not change the speed. Prints a markdown table row.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ldm.checkpoint import load_model_from_config
from ldm.config_files import read_config_file
from ldm.sample import generate, prepare_for_sampling, seeded_noise
from ldm.util import default_precision, instantiate_from_config

VAE_FACTOR = 8  # pixels per latent, in every SD config
HEADER = (
    "| device | config | H x W | batch | steps | precision | compile | DDIM steps/s | s/image |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


class StepTimer:
    """Wall time from the first to the end of the last of `steps` calls of a module, with the
    device synchronised at both ends (so the queued GPU work is counted)."""

    def __init__(self, module: torch.nn.Module, steps: int, device: torch.device):
        self.steps, self.device, self.calls = steps, device, 0
        self.start = self.end = 0.0
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, module, args) -> None:
        self.calls += 1
        if self.calls == 1:
            self._sync()
            self.start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        if self.calls == self.steps:
            self._sync()
            self.end = time.perf_counter()

    def reset(self) -> None:
        self.calls = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start


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
        # Only the UNet: the per-step wrapper (with the timer's hooks) stays eager.
        model.model.diffusion_model.compile()
    return model


def bench(model: torch.nn.Module, opt: argparse.Namespace) -> tuple[float, float]:
    """(DDIM steps/s, s/image), medians over the timed runs."""
    device = torch.device(opt.device)
    timer = StepTimer(model.model, opt.steps, device)
    prompts = ["a photo of sks dog in a bucket"] * opt.batch
    x_T = seeded_noise(
        list(range(opt.batch)), (model.channels, opt.H // VAE_FACTOR, opt.W // VAE_FACTOR)
    )
    step_times, totals = [], []
    for run in range(opt.runs + 1):  # run 0 warms up (and compiles)
        timer.reset()
        start = time.perf_counter()
        # .cpu(), as txt2img does: it waits for the device to finish.
        generate(model, prompts, x_T, opt.steps, scale=opt.scale, precision=opt.precision).cpu()
        total = time.perf_counter() - start
        if run > 0:
            step_times.append(timer.seconds)
            totals.append(total)
    return opt.steps / statistics.median(step_times), statistics.median(totals) / opt.batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--ckpt", help="weights to load (default: random weights)")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--W", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per generate call")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale (1 = no guidance)")
    p.add_argument("--precision", choices=["full", "autocast", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument("--no-header", action="store_true", help="print the row only")
    opt = p.parse_args(argv)
    opt.precision = opt.precision or default_precision(opt.device)
    if opt.H % 64 or opt.W % 64:
        p.error("--H and --W must be multiples of 64")
    return opt


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    try:
        model = build_model(opt)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{Path(__file__).name}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    steps_per_s, s_per_image = bench(model, opt)
    row = [device_name(torch.device(opt.device)), Path(opt.config).stem, f"{opt.H} x {opt.W}"]
    row += [str(opt.batch), str(opt.steps), opt.precision, "yes" if opt.compile else "no"]
    row += [f"{steps_per_s:.2f}", f"{s_per_image:.2f}"]
    if not opt.no_header:
        print(HEADER)
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
