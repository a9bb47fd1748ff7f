"""Speed and peak memory of DreamBooth training steps, through the real training code.

    python scripts/bench_train.py --base configs/dreambooth/v1-finetune_unfrozen.yaml \
        --size 512 --precision bf16 --grad_ckpt
    python scripts/bench_train.py --matrix --size 512        # the main combinations, one per process
    python scripts/bench_train.py --capture ...              # the step as a CUDA graph (unverified)

Random full-size weights (no checkpoint needed), the bundled demo photos as instance images and
copies of them as class images (batch B instance + B class, as with prior preservation). It runs
`ldm.train.setup` and `ldm.train.loop.train_step` exactly as main.py does, times `--steps` steps
after `--warmup`, and prints a markdown row: s/step, images/s through the UNet, and the peak memory
of the timed steps (CUDA max allocated on a GPU; the process's peak RSS on the CPU). In the
matrix each profile that `train.capture` applies to is followed by its captured twin; where the
captured step cannot run (no CUDA) the row says "capture off (why)" and times the eager step.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldm.train.captured import CapturedStep, capture_unavailable
from ldm.train.config import load_config
from ldm.train.distributed import DistEnv
from ldm.train.logger import RunLogger, peak_memory_gb, reset_peak_memory
from ldm.train.loop import train_step
from ldm.train.setup import setup

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "data" / "demo" / "dog"
HEADER = (
    "| config | size | batch | precision | trains | switches | s/step | images/s | peak GB |\n"
    "|---|---|---|---|---|---|---|---|---|"
)
# (name, extra flags): (a) fastest and (b) leanest settings, with and without the text encoder.
MATRIX = [
    ("fp32 baseline", ["--precision", "32", "--no_cache"]),
    ("bf16", ["--precision", "bf16"]),
    ("fp16", ["--precision", "16"]),
    ("bf16 fast", ["--precision", "bf16", "--channels_last", "--compile"]),
    ("bf16 ckpt", ["--precision", "bf16", "--grad_ckpt"]),
    ("bf16 lean", ["--precision", "bf16", "--grad_ckpt", "--fused_backward"]),
    (
        "bf16 lean 8-bit",
        ["--precision", "bf16", "--grad_ckpt", "--fused_backward", "--optimizer", "adamw8bit"],
    ),
    ("bf16 +text fast", ["--precision", "bf16", "--text_encoder"]),
    (
        "bf16 +text lean",
        ["--precision", "bf16", "--text_encoder", "--grad_ckpt", "--fused_backward"],
    ),
    ("bf16 lora", ["--precision", "bf16", "--lora"]),
    ("bf16 lora ckpt", ["--precision", "bf16", "--lora", "--grad_ckpt"]),
]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=str(ROOT / "configs/dreambooth/v1-finetune_unfrozen.yaml"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument(
        "--batch", type=int, default=1, help="instance images per step (+ as many class)"
    )
    p.add_argument("--precision", default="bf16", help="32, bf16 or 16")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--text_encoder", action="store_true", help="train the text encoder too")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (train.lora) instead")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--no_cache", action="store_true", help="run the VAE every step")
    p.add_argument("--fused_backward", action="store_true", help="optimizer step inside backward")
    p.add_argument("--optimizer", default="adamw", help="adamw or adamw8bit")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument(
        "--capture", action="store_true", help="the step as a CUDA graph (train.capture)"
    )
    p.add_argument("--matrix", action="store_true", help="run the main combinations")
    p.add_argument("--name", default="", help="row label")
    return p.parse_known_args(argv)


def overrides(args, data: Path) -> list[str]:
    parts = ["lora", "text_encoder_lora"] if args.lora else ["unet", "text_encoder"]
    trains = f"[{','.join(parts if args.text_encoder else parts[:1])}]"
    return [
        f"data.instance_root={data / 'instance'}",
        f"data.class_root={data / 'class'}",
        "data.class_word=dog",
        f"data.size={args.size}",
        "data.num_workers=2",
        "prior.num_class_images=4",
        f"train.max_steps={args.warmup + args.steps}",
        f"train.batch_size={args.batch}",
        f"train.precision={args.precision}",
        f"train.trainable={trains}",
        f"train.gradient_checkpointing={args.grad_ckpt}",
        f"train.cache_latents={not args.no_cache}",
        f"train.fused_backward={args.fused_backward}",
        f"train.grad_clip={0 if args.fused_backward else 1.0}",
        f"train.optimizer={args.optimizer}",
        f"train.channels_last={args.channels_last}",
        f"train.compile={args.compile}",
        f"train.capture={args.capture}",
        "train.val_every=0",
        "train.sample.every=0",
        "train.log_every=1000000",
    ]


def measure(args, extra: list[str]) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = DistEnv(0, 0, 1, device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        shutil.copytree(PHOTOS, data / "instance")
        shutil.copytree(PHOTOS, data / "class")
        (data / "class" / "04.jpg").unlink()
        cfg = load_config([args.base], [*overrides(args, data), *extra])
        session = setup(cfg, env, None, False, RunLogger(None, 0, cfg.train.max_steps))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        # A captured step is recorded after its eager warm-up steps: all of that is warm-up here.
        warmup = max(args.warmup, CapturedStep.WARMUP + 1) if session.captured else args.warmup
        for _ in range(warmup):
            train_step(session, cfg, env)
        sync()
        reset_peak_memory(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(session, cfg, env)
        sync()
        seconds = (time.perf_counter() - start) / args.steps
    images = args.batch * len(session.kinds)
    return {
        "s_per_step": seconds,
        "images_per_s": images / seconds,
        "peak_gb": peak_memory_gb(device),
        "eager_because": capture_unavailable(cfg, env) if args.capture else None,
    }


def switches(args, result: dict) -> str:
    names = ["grad_ckpt", "no_cache", "fused_backward", "channels_last", "compile", "capture"]
    on = [n for n in names if getattr(args, n)]
    if args.optimizer != "adamw":
        on.append(args.optimizer)
    if result.get("eager_because"):  # the row must not pass an eager step off as captured
        on[on.index("capture")] = f"capture off ({result['eager_because']})"
    return ", ".join(on) or "-"


def capturable(flags: list[str]) -> bool:
    """Whether a MATRIX profile can run as a captured step (ldm.train.captured)."""
    return "--fused_backward" not in flags and "adamw8bit" not in flags


def matrix() -> list[tuple[str, list[str]]]:
    """MATRIX, each profile that can be captured followed by its captured twin."""
    rows = []
    for name, flags in MATRIX:
        rows.append((name, flags))
        if capturable(flags):
            rows.append((f"{name} captured", [*flags, "--capture"]))
    return rows


def row(args, result: dict) -> str:
    trains = ("lora " if args.lora else "") + ("unet+text" if args.text_encoder else "unet")
    name = args.name or Path(args.base).stem
    return (
        f"| {name} | {args.size} | {args.batch}+{args.batch} | {args.precision} | {trains} | "
        f"{switches(args, result)} | {result['s_per_step']:.3f} | {result['images_per_s']:.2f} | "
        f"{result['peak_gb']:.2f} |"
    )


def run_matrix(argv: list[str]) -> int:
    """Each combination in a fresh process, so peak memory is its own."""
    base = [a for a in argv if a != "--matrix"]
    print(HEADER, flush=True)
    for name, flags in matrix():
        command = [sys.executable, __file__, *base, *flags, "--name", name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            print(done.stdout.strip().splitlines()[-1], flush=True)
        else:
            reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(
                f"| {name} | - | - | - | - | {' '.join(flags)} | failed: {reason[:120]} | | |",
                flush=True,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    if args.matrix:
        return run_matrix(argv)
    result = measure(args, extra)
    print(f"{HEADER}\n{row(args, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
