"""Every speed figure of this project on one machine, in one table (run by scripts/gpu_check.sh).

    bash scripts/gpu_check.sh          # a GPU machine: full-size SD v1 at 512 px, in --budget s
    bash scripts/gpu_check.sh --tiny   # the CPU: tiny configs, in seconds (tests/test_captured.py)

It measures, eager and captured (CUDA graphs: `train.capture`, `--capture`): every bench_train.py
profile (s/step and peak memory), bench_sample.py at batch 1 and at the class-image batches (50
DDIM steps with guidance), and the time to a trained subject: main.py on full-size random weights
written to a temporary checkpoint, with the paper's defaults (200 class images sampled first,
800 steps, the default validation, grids and checkpoints). Where diffusers is installed, its
train_dreambooth.py step and StableDiffusionPipeline run in the same call (bench_diffusers.py).

Jobs run in order of importance, each in its own process (its own peak memory; a crash costs that
job only) under a time limit, until `--budget` seconds are spent; what did not fit is listed as
skipped. With --tiny they run in this process on the CPU (where capture falls back to eager).
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_train  # noqa: E402  (scripts/ is not a package)
from gpu_report import MARKER, Job, Report, Result, last_line, read_losses  # noqa: E402
from gpu_report import name as key_name  # noqa: E402

TINY_PROFILES = ("bf16", "bf16 +text lean")  # --tiny: the captured twin of bf16 only
DIFFUSERS_TWIN = {"bf16": [], "bf16 ckpt": ["--grad_ckpt"], "bf16 +text fast": ["--text_encoder"]}


def settings(opt) -> dict:
    if opt.tiny:
        return dict(
            base="configs/dreambooth/tiny-random.yaml", sample="configs/stable-diffusion/v1-tiny.yaml",
            train_size=32, sample_size=64, steps=1, warmup=1, ddim=2, solver=2, runs=1,
            subject="2 class images, 4 steps", equal_classes=2, equal_steps=3,
            e2e=["data.size=32", "prior.num_class_images=2", "prior.ddim_steps=2",
                 "train.max_steps=4", "train.val_every=2", "train.sample.every=2",
                 "train.sample.ddim_steps=2", "train.save_every=2", "data.num_workers=0"],
        )  # fmt: skip
    return dict(
        base="configs/dreambooth/v1-finetune_unfrozen.yaml",
        sample="configs/stable-diffusion/v1-inference.yaml",
        train_size=512, sample_size=512, steps=5, warmup=2, ddim=50, solver=25, runs=2,
        subject="200 class images, 800 steps, main.py's defaults", equal_classes=4, equal_steps=30,
        e2e=[],
    )  # fmt: skip


def plan(opt, ckpt: Path, work: Path) -> list[Job]:
    """The jobs, most important first (priority), then in table order."""
    s, dev = settings(opt), ["--device", opt.device]
    train = ["--base", s["base"], "--size", str(s["train_size"]), "--steps", str(s["steps"])]
    train += ["--warmup", str(s["warmup"]), *dev, f"train.actual_resume={ckpt}"]
    jobs = []
    for name, flags in bench_train.matrix():
        mode = "captured" if "--capture" in flags else "eager"
        label = name.removesuffix(" captured")
        if opt.tiny and (label not in TINY_PROFILES or mode == "captured" and label != "bf16"):
            continue  # the suite's time; never torch.compile on a CPU (minutes)
        # bf16 first, then the memory profiles that issue 10's targets name, beside diffusers
        priority = 1 if label == "bf16" else 7 if "--compile" in flags else 5
        if label in ("bf16 balanced", "bf16 lean"):
            priority = 4
        limit = 300 if "--compile" in flags else 120
        argv = [*train, *flags, "--name", name]
        jobs.append(Job(("train", label, mode), "scripts/bench_train.py", argv, limit, priority))
    sample = ["--config", s["sample"], "--ckpt", str(ckpt), "--H", str(s["sample_size"])]
    sample += ["--W", str(s["sample_size"]), "--steps", str(s["ddim"]), "--runs", str(s["runs"])]
    sample += ["--batch", "1", *map(str, opt.class_batch), *dev]
    for mode, extra in (("eager", []), ("captured", ["--capture"])):
        jobs.append(Job(("sample", "", mode), "scripts/bench_sample.py", sample + extra, 240, 2))
    # The fine-tuning configs' class-image sampler (DPM-Solver++, half DDIM's steps), captured.
    argv = [*sample[: sample.index("--steps")], "--runs", str(s["runs"]), *dev, "--capture"]
    argv += ["--sampler", "dpmpp_2m", "--steps", str(s["solver"]), "--batch"]
    argv += [str(batch) for batch in opt.class_batch]
    jobs.append(Job(("sample", "dpmpp_2m", "captured"), "scripts/bench_sample.py", argv, 240, 3))
    e2e = ["--base", s["base"], "-t", "--actual_resume", str(ckpt), "--data_root", "data/demo/dog"]
    e2e += ["--class_word", "dog", *dev, *s["e2e"]]
    for mode, priority in (("captured", 3), ("eager", 8))[: 1 if opt.tiny else 2]:
        argv = [*e2e, "--reg_data_root", str(work / f"class-{mode}"), "-l", str(work / "logs")]
        argv += ["-n", mode, f"train.capture={mode == 'captured'}"]
        jobs.append(Job(("e2e", "", mode), "main.py", argv, 420, priority))
    # Captured against eager: the same steps from the same weights and class images; the table
    # gives the largest relative difference of their per-step losses (what capture needs to show
    # before it can be the default on CUDA).
    equal = [*e2e, "--reg_data_root", str(work / "class-equal"), "-l", str(work / "equal")]
    equal += [f"prior.num_class_images={s['equal_classes']}", f"train.max_steps={s['equal_steps']}"]
    equal += ["train.val_every=0", "train.sample.every=0", "train.save_every=0"]
    for mode in ("eager", "captured"):
        argv = [*equal, "-n", mode, f"train.capture={mode == 'captured'}"]
        jobs.append(Job(("equal", "", mode), "main.py", argv, 150, 2))
    twin = ["--size", str(s["train_size"]), "--steps", str(s["steps"]), *dev]
    twin += ["--warmup", str(s["warmup"])] + ["--tiny"] * opt.tiny
    for label, flags in DIFFUSERS_TWIN.items():
        argv = ["train", *twin, *flags]
        key = ("train", label, "diffusers")
        jobs.append(Job(key, "scripts/bench_diffusers.py", argv, 150, 4 if not flags else 6))
    argv = ["sample", "--size", str(s["sample_size"]), "--steps", str(s["ddim"]), *dev]
    argv += ["--runs", str(s["runs"]), "--batch", "1", *map(str, opt.class_batch)]
    argv += ["--tiny"] * opt.tiny
    jobs.append(Job(("sample", "", "diffusers"), "scripts/bench_diffusers.py", argv, 240, 4))
    return sorted(jobs, key=lambda j: j.priority)


class Lines(io.TextIOBase):
    """Collects output and the time at which a line with MARKER first appears."""

    def __init__(self, start: float):
        self.start, self.parts, self.marks = start, [], {}

    def write(self, text: str) -> int:
        self.parts.append(text)
        if MARKER in text and MARKER not in self.marks:
            self.marks[MARKER] = time.perf_counter() - self.start
        return len(text)

    def text(self) -> str:
        return "".join(self.parts)


_MODULES: dict[str, object] = {}


def in_process(job: Job) -> Result:
    """--tiny: the script's main(argv) in this process (imports are paid once)."""
    if job.script not in _MODULES:
        spec = importlib.util.spec_from_file_location(Path(job.script).stem, ROOT / job.script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[job.script] = module
    start = time.perf_counter()
    out, err = Lines(start), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = _MODULES[job.script].main(job.argv) or 0
        except SystemExit as e:
            code = e.code
        except Exception:  # the table reports it; the traceback goes with it
            code, _ = 1, err.write(traceback.format_exc())
    error = None if code == 0 else last_line(err.getvalue()) or f"exit status {code}"
    return Result(time.perf_counter() - start, out.text(), error, out.marks, err.getvalue())


def in_subprocess(job: Job, limit: float) -> Result:
    """The script in its own process, killed after `limit` seconds."""
    start = time.perf_counter()
    out = Lines(start)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, job.script, *job.argv], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=err, text=True,
        )  # fmt: skip
        killer = threading.Timer(limit, proc.kill)
        killer.start()
        for line in proc.stdout:
            out.write(line)
        code = proc.wait()
        killer.cancel()
        err.seek(0)
        stderr = err.read()
    seconds = time.perf_counter() - start
    error = None
    if code != 0:
        error = f"timed out after {seconds:.0f} s" if seconds >= limit else last_line(stderr)
        error = error or f"exit status {code}"
    return Result(seconds, out.text(), error, out.marks, stderr)


def log_job(path: str | None, job: Job, result: Result) -> None:
    """Append a job's command, outcome and output tails to `--log` (the first look on failure)."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(f"=== {key_name(job.key)}: {job.script} {' '.join(job.argv)}\n")
        f.write(f"--- {result.seconds:.1f} s, {result.error or 'ok'}\n")
        f.write(f"--- stdout (tail)\n{result.out[-6000:]}\n--- stderr (tail)\n")
        f.write(f"{result.stderr[-6000:]}\n")


def write_checkpoint(config: str, out: Path, device: str) -> None:
    """Random weights in the SD layout, made on the device; zero-initialised layers (SD's output
    layers) randomised too, so that every part trains as it would from a real checkpoint."""
    from ldm.checkpoint import save_checkpoint
    from ldm.config_files import read_config_file
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    # Built on the CPU: the schedule's buffers go through numpy.
    model = instantiate_from_config(read_config_file(ROOT / config).model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    save_checkpoint({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, out)


def environment(opt) -> str:
    parts = [
        torch.cuda.get_device_name() if opt.device == "cuda" else f"CPU ({platform.machine()})"
    ]
    parts.append(
        f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" * (opt.device == "cuda"))
    )
    parts.append(f"Python {platform.python_version()}")
    for name in ("transformers", "diffusers"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"no {name}")
    return " | ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU, in this process")
    p.add_argument("--budget", type=float, default=450, help="seconds for all jobs")
    p.add_argument("--class_batch", type=int, nargs="+", help="class-image batches to time")
    p.add_argument("--work", help="folder for the checkpoint and runs (default: a temporary one)")
    p.add_argument("--log", help="a file for each job's command and output (e.g. $OUT/gpu.log)")
    p.add_argument("--write_checkpoint", help=argparse.SUPPRESS)  # the first job, in a process
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opt = p.parse_args(argv)
    if opt.tiny:
        opt.device = "cpu"
    opt.class_batch = opt.class_batch or ([2] if opt.tiny else [4, 16])
    return opt


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    if opt.write_checkpoint:
        write_checkpoint(opt.config, Path(opt.write_checkpoint), opt.device)
        return 0
    start = time.perf_counter()
    s = settings(opt)
    work = Path(opt.work) if opt.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "random-weights.ckpt"
    argv = ["--write_checkpoint", str(ckpt), "--config", s["base"], "--device", opt.device]
    jobs = [Job(("checkpoint", "", ""), "scripts/gpu_check.py", argv, 300, 0)]
    print(f"gpu_check: {environment(opt)}", flush=True)
    results: dict[tuple, Result] = {}
    try:
        for job in jobs + plan(opt, ckpt, work):
            left = start + opt.budget - time.perf_counter()
            if results.get(jobs[0].key, Result()).error:
                results[job.key] = Result(error="no checkpoint: see the first note")
            elif left < (0 if opt.tiny else 20):
                results[job.key] = Result(error="skipped: time budget")
            else:
                results[job.key] = (
                    in_process(job) if opt.tiny else in_subprocess(job, min(job.limit, left))
                )
            result = results[job.key]
            if job.key[0] == "equal" and result.error is None:
                try:
                    read_losses(result)
                except (OSError, StopIteration, KeyError, ValueError) as e:
                    result.error = f"no losses: {e}"
            log_job(opt.log, job, result)
            print(f"[{time.perf_counter() - start:5.0f} s] {key_name(job.key)}: "
                  f"{result.seconds:.0f} s, {result.error or 'ok'}", flush=True)  # fmt: skip
    finally:
        if not opt.work:
            shutil.rmtree(work, ignore_errors=True)
    report = Report(results)
    if results[jobs[0].key].error:
        report.note(f"checkpoint: {results[jobs[0].key].error}")
    print(report.table(opt, s))
    print(f"total {time.perf_counter() - start:.0f} s (budget {opt.budget:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
