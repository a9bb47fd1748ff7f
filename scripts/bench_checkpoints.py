"""Bytes a run folder keeps and writes, through the real saving code, at full size.

    python scripts/bench_checkpoints.py                      # SD v1, 800 steps, the defaults
    python scripts/bench_checkpoints.py train.lean_fp16=false
    python scripts/bench_checkpoints.py --step_seconds 0.055 train.async_save=true  # the pauses

Random full-size weights (no checkpoint needed) and AdamW state of the real size (zeros, as the
bytes are what counts), the demo photos at `data.size=64`. The loop (`ldm.train.loop.train`) runs
as main.py runs it, save schedule, validation and all, except that a training step only advances
the step counter and the validation loss follows a script: `improving` (a new best at every
validation) or `worst` (bests between save points, so best.ckpt must be written from memory at
each save point). It counts every byte written by `ldm.checkpoint` and, at the end, the bytes
the checkpoints folder keeps, in units of one full training checkpoint (last.ckpt), and the
seconds the loop stood still for saving (in `RunCheckpoints.save` and `.wait`). A step takes
`--step_seconds` (a sleep standing in for a GPU step), the time a background save
(`train.async_save=true`) has to hide its write in.
"""

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

import ldm.checkpoint
from ldm.train import loop
from ldm.train.config import load_config
from ldm.train.distributed import DistEnv
from ldm.train.evaluation import Validation
from ldm.train.saving import RunCheckpoints
from ldm.train.state import RunDir

ROOT = Path(__file__).resolve().parents[1]
# Validation losses at steps 100, 200, ..., 800 (val_every 100).
SCRIPTS = {
    "improving": [8, 7, 6, 5, 4, 3, 2, 1],
    "worst": [8, 7, 6, 5, 5.5, 4, 3, 3.5],  # bests at 400 and 700, between save points
}


def fake_step(session, cfg, env, seconds: float = 0.0) -> dict:
    """The step counter only (what is saved does not depend on the weights' values), taking
    `seconds`."""
    time.sleep(seconds)
    session.state.step += 1
    return {"step": session.state.step, "loss": 0.0, "loss_instance": 0.0, "lr": 0.0}


def fill_optimizer_state(optimizer) -> None:
    """AdamW's state after a step: step count and the two moments of every trained parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(1.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }


def timed(method, paused: dict):
    """`method`, adding its time to paused["s"] (calls from inside it are not counted twice)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        paused["depth"] += 1
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            paused["depth"] -= 1
            if paused["depth"] == 0:
                paused["s"] += time.perf_counter() - start

    return run


def measure(base: str, overrides: list[str], script: list[float], step_seconds: float) -> dict:
    written = {"bytes": 0, "files": 0}
    paused = {"s": 0.0, "depth": 0}
    atomic_write = ldm.checkpoint._atomic_write

    def counting_write(path, write, nbytes=0):
        atomic_write(path, write, nbytes)
        if Path(path).suffix == ".ckpt":  # not the config file
            written["bytes"] += Path(path).stat().st_size
            written["files"] += 1

    losses = iter(script)
    setup = loop.setup

    def setup_with_state(*args, **kwargs):
        session = setup(*args, **kwargs)
        fill_optimizer_state(session.optimizer)
        return session

    patches = [
        (ldm.checkpoint, "_atomic_write", counting_write),
        (loop, "train_step", functools.partial(fake_step, seconds=step_seconds)),
        (RunCheckpoints, "save", timed(RunCheckpoints.save, paused)),
        (RunCheckpoints, "wait", timed(RunCheckpoints.wait, paused)),
        (loop, "setup", setup_with_state),
        (Validation, "loss", lambda self, model, precision: next(losses)),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            cfg = load_config([base], overrides)
            run = RunDir(Path(tmp) / "run")
            run.create()
            loop.train(cfg, run, DistEnv(0, 0, 1, torch.device("cpu")))
            files = {p.name: p.stat() for p in run.checkpoints.glob("*.ckpt")}
            kept = sum({s.st_ino: s.st_size for s in files.values()}.values())
            full = files["last.ckpt"].st_size
            sizes = {name: s.st_size / full for name, s in sorted(files.items())}
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return {"full_gb": full / 1e9, "kept": kept / full, "written": written["bytes"] / full,
            "writes": written["files"], "sizes": sizes, "paused": paused["s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=str(ROOT / "configs/dreambooth/v1-finetune_unfrozen.yaml"))
    p.add_argument("--scripts", default="improving,worst", help="validation scripts to run")
    p.add_argument("--step_seconds", type=float, default=0.0, help="each (fake) step's time")
    args, extra = p.parse_known_args(argv)
    overrides = [
        f"data.instance_root={ROOT / 'data' / 'demo' / 'dog'}",
        "data.class_word=dog",
        "data.size=64",
        "data.num_workers=0",
        "train.sample.every=0",
        "train.val_timesteps=1",
        *extra,
    ]
    print(
        "| validation | full checkpoint | kept | written | files written | each file / full "
        "| loop paused for saving, s |\n|---|---|---|---|---|---|---|"
    )
    for name in args.scripts.split(","):
        r = measure(args.base, overrides, SCRIPTS[name], args.step_seconds)
        each = ", ".join(f"{n} {x:.2f}x" for n, x in r["sizes"].items())
        print(
            f"| {name} | {r['full_gb']:.2f} GB | {r['kept']:.2f}x | {r['written']:.2f}x | "
            f"{r['writes']} | {each} | {r['paused']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
