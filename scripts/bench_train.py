"""Speed and peak memory of DreamBooth training steps, through the real training code.

    python scripts/bench_train.py --base configs/dreambooth/v1-finetune_unfrozen.yaml \
        --size 512 --precision bf16 --profile lean
    python scripts/bench_train.py --matrix --size 512        # the profiles, one process each
    python scripts/bench_train.py --capture ...              # the step as a CUDA graph (unverified)

Random full-size weights (no checkpoint needed), the bundled demo photos as instance images and
copies of them as class images (batch B instance + B class, as with prior preservation). It runs
`ldm.train.setup` and `ldm.train.loop.train_step` exactly as main.py does, times `--steps` steps
after `--warmup`, and prints a markdown row: s/step, images/s through the UNet, the peak memory
of the timed steps (CUDA max allocated on a GPU; the process's peak RSS on the CPU) and the peak
the run expected at start-up (ldm.train.memory.expected_peak). A switch flag overrides the
profile's choice for that switch; without it the profile (`train.memory_profile`) decides. In the
matrix each row that `train.capture` applies to is followed by its captured twin; where the
captured step cannot run (no CUDA) the row says "capture off (why)" and times the eager step.

MATRIX below is the one list of benchmarked settings (scripts/gpu_check.py runs it).
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
from ldm.train.config import PROFILES, load_config
from ldm.train.distributed import DistEnv
from ldm.train.logger import RunLogger, peak_memory_gb, reset_peak_memory
from ldm.train.loop import train_step
from ldm.train.memory import peak_bytes
from ldm.train.setup import setup

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "data" / "demo" / "dog"
HEADER = (
    "| config | size | batch | precision | trains | profile | switches | s/step | images/s "
    "| peak GiB | expected GiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
)
# (name, extra flags; the profile is fast unless --profile says otherwise): the memory profiles
# (README, "Memory and speed"), UNet alone and with the text encoder, beside the uncached fp32
# baseline, fp16, a compiled run, checkpointing alone and lean with fp32 AdamW state.
MATRIX = [
    ("fp32 baseline", ["--precision", "32", "--no_cache"]),
    ("bf16", ["--profile", "fast"]),
    ("fp16", ["--precision", "16"]),
    ("bf16 fast", ["--channels_last", "--compile"]),
    ("bf16 ckpt", ["--grad_ckpt"]),
    ("bf16 balanced", ["--profile", "balanced"]),
    ("bf16 lean", ["--profile", "lean"]),
    ("bf16 lean fp32-AdamW", ["--profile", "lean", "--optimizer", "adamw"]),
    ("bf16 +text fast", ["--text_encoder"]),
    ("bf16 +text balanced", ["--profile", "balanced", "--text_encoder"]),
    ("bf16 +text lean", ["--profile", "lean", "--text_encoder"]),
    ("bf16 lora", ["--lora"]),
    ("bf16 lora lean", ["--lora", "--profile", "lean"]),
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
    p.add_argument("--profile", default="fast", help="train.memory_profile: fast, balanced, lean")
    p.add_argument("--lora", action="store_true", help="LoRA adapters (train.lora) instead")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--no_cache", action="store_true", help="run the VAE every step")
    p.add_argument("--fused_backward", action="store_true", help="optimizer step inside backward")
    p.add_argument("--optimizer", default=None, help="adamw or adamw8bit (default: the profile's)")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument(
        "--capture", action="store_true", help="the step as a CUDA graph (train.capture)"
    )
    p.add_argument("--matrix", action="store_true", help="run the main combinations")
    p.add_argument("--rows", default="", help="with --matrix: only these rows (comma-separated)")
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
        f"train.memory_profile={args.profile}",
        f"train.cache_latents={not args.no_cache}",
        f"train.channels_last={args.channels_last}",
        f"train.compile={args.compile}",
        f"train.capture={args.capture}",
        "train.val_every=0",
        "train.sample.every=0",
        "train.log_every=1000000",
        *(["train.gradient_checkpointing=true"] if args.grad_ckpt else []),
        *(["train.fused_backward=true"] if args.fused_backward else []),
        *([f"train.optimizer={args.optimizer}"] if args.optimizer else []),
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
        "expected_gb": peak_bytes(session.expected_peak) / 2**30,
        "switches": resolved_switches(
            cfg.train, capture_unavailable(cfg, env) if args.capture else None
        ),
    }


def resolved_switches(t, eager_because: str | None) -> str:
    """The switches the run used, after the profile and the flags."""
    on = [t.optimizer]
    names = ["gradient_checkpointing", "fused_backward", "offload_frozen", "channels_last"]
    on += [n for n in names if t[n]]
    on += ["no_cache"] if not t.cache_latents else []
    on += ["compile"] if t.compile else []
    if t.capture:  # the row must not pass an eager step off as captured
        on.append(f"capture off ({eager_because})" if eager_because else "capture")
    return ", ".join(on)


def capturable(flags: list[str]) -> bool:
    """Whether a MATRIX row can run as a captured step (ldm.train.captured): AdamW stepped after
    backward, by the flags and by the row's memory profile."""
    profile = PROFILES[flags[flags.index("--profile") + 1] if "--profile" in flags else "fast"]
    optimizer = flags[flags.index("--optimizer") + 1] if "--optimizer" in flags else None
    fused = "--fused_backward" in flags or profile["fused_backward"]
    return not fused and (optimizer or profile["optimizer"]) == "adamw"


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
        f"{args.profile} | {result['switches']} | {result['s_per_step']:.3f} | "
        f"{result['images_per_s']:.2f} | {result['peak_gb']:.2f} | {result['expected_gb']:.2f} |"
    )


def run_matrix(argv: list[str]) -> int:
    """Each combination in a fresh process, so peak memory is its own."""
    args, _ = parse_args(argv)
    base = [a for a in argv if a != "--matrix"]
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(chosen) - {name for name, _ in matrix()}
    if unknown:
        raise SystemExit(f"--rows: no row named {', '.join(sorted(unknown))}")
    print(HEADER, flush=True)
    for name, flags in matrix():
        if chosen and name not in chosen:
            continue
        command = [sys.executable, __file__, *base, *flags, "--name", name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            print(done.stdout.strip().splitlines()[-1], flush=True)
        else:
            reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
            if done.returncode < 0:  # no traceback: SIGKILL is most often the OOM killer
                reason = f"killed by signal {-done.returncode} (out of memory?)"
            print(
                f"| {name} | - | - | - | - | - | {' '.join(flags)} | failed: {reason[:120]} "
                "| | | |",
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
