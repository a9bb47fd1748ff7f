"""The one sweep runner, under scripts/sweep.py (grids) and scripts/ablate.py (the paper's variants).

A job is a run to train through main.py (configs and `key=value` overrides) and, if it names an
evaluation target and subject (scripts/targets.py), to evaluate: the target measures the run's
last.ckpt and the figures go into the run's summary (eval/<name>), where the tables read them. Each job owns a folder of run folders; its run is the newest one with a last.ckpt, so a
rerun skips a finished run, resumes a stopped one, and starts one that never saved. Jobs run one
after another in this process, or one per GPU from a queue, each in its own process
(`sweep.py --job JSON`). A failed job is recorded and the others go on; a stop signal ends the
sweep after the running jobs have saved their checkpoints.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import main as train_main
from ldm.checkpoint import read_checkpoint
from ldm.config_files import config_from_data
from ldm.train.config import config_leaves, load_config, uses_prior
from ldm.train.state import RunDir
from ldm.train.trackers import read_summary, record_evaluation
from scripts import targets
from scripts.targets import Target, TargetSubject

SCRIPT = Path(__file__).resolve().parent / "sweep.py"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
POLL_S = 2.0  # how often a queued job waiting on a class-image folder looks at it again
RESUMABLE = ("train.max_steps",)  # what may change between a run and its resumption by a sweep


class Stopped(Exception):
    """A stop signal ended a run before its last step; rerunning the sweep continues it."""


@dataclass(frozen=True)
class Job:
    name: str  # unique in the sweep, e.g. "lr=1e-6_max_steps=400" or "dog/prior"
    labels: tuple[tuple[str, str], ...]  # its columns in the sweep's table
    bases: tuple[str, ...]
    overrides: tuple[str, ...]
    logdir: str  # its run folders
    max_steps: int = 0
    class_root: str | None = None  # the class-image folder it fills (None: no prior loss)
    class_images: int = 0  # how many images that folder needs
    target: Target | None = None  # what measures its run (None: no evaluation)
    subject: TargetSubject | None = None  # the target's subject the run trains on
    device: str | None = None
    error: str | None = None  # why it cannot run (its config does not load)

    @property
    def run_name(self) -> str:
        return self.name.replace("/", "_")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def fail(prog: str, e: BaseException) -> int:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return 1


def make_job(name, labels, bases, overrides, logdir, target=None, subject=None, device=None) -> Job:
    """A job, checked as main.py will load it; a config that does not load gives a job that
    reports its error instead of running. `target` evaluates the run as one of `subject`."""
    job = Job(
        name,
        labels=tuple((key, str(value)) for key, value in labels),
        bases=tuple(map(str, bases)),
        overrides=tuple(overrides),
        logdir=str(logdir),
        target=target,
        subject=subject,
        device=device,
    )
    try:
        cfg = load_config(job.bases, job.overrides)
    except ValueError as e:
        return replace(job, error=one_line(e))
    return replace(
        job,
        max_steps=cfg.train.max_steps,
        class_root=str(cfg.data.class_root) if uses_prior(cfg) else None,
        class_images=cfg.prior.num_class_images,
    )


def job_to_json(job: Job) -> str:
    """The job for a worker process (`sweep.py --job JSON`)."""
    data = {f.name: getattr(job, f.name) for f in fields(job)}
    data["target"] = None if job.target is None else targets.to_json(job.target)
    data["subject"] = None if job.subject is None else targets.to_json(job.subject)
    return json.dumps(data)


def job_from_json(text: str) -> Job:
    data = json.loads(text)
    data["labels"] = tuple(tuple(pair) for pair in data["labels"])
    for key in ("bases", "overrides"):
        data[key] = tuple(data[key])
    data["target"], data["subject"] = (
        targets.from_json(data["target"]),
        targets.from_json(data["subject"]),
    )
    return Job(**data)


def split_args(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    """Arguments a script does not know: (`key=value` training overrides, evaluate.py flags)."""
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    return overrides, [a for a in rest if a not in overrides]


def load_networks(target: Target, gpus, device: str | None, networks: Any = None) -> Any:
    """The target's measuring networks, built before any training so that a missing weight file
    fails now; with GPU workers (which build their own) only as that check, on the CPU."""
    if networks is not None:
        return networks
    return target.load("cpu" if gpus else device)


def finish(prog: str, failed: set[str], stopped: bool) -> int:
    """The closing lines of a sweep; its exit code (a stop is not a failure)."""
    if stopped:
        print(f"{prog}: stopped; rerun the same command to continue", file=sys.stderr)
    if failed:
        print(f"{prog}: failed: {', '.join(sorted(failed))}", file=sys.stderr)
    return 1 if failed else 0


def latest_run(job: Job) -> Path | None:
    logdir = Path(job.logdir)
    runs = [p for p in logdir.iterdir() if RunDir(p).last.is_file()] if logdir.is_dir() else []
    return max(runs, key=lambda p: p.name) if runs else None


def trained_steps(run: Path) -> int:
    return int(read_checkpoint(RunDir(run).last)[1].get("global_step", 0))


def trained_config(run: Path) -> DictConfig:
    """The config inside the run's last.ckpt (read as a config from a file: bounded)."""
    last = RunDir(run).last
    return config_from_data(read_checkpoint(last)[1].get("config", {}), f"{last}: config")


def changed_settings(job: Job, run: Path) -> list[str]:
    """Config keys whose value in the run differs from the job's (beyond RESUMABLE ones)."""
    ours = config_leaves(load_config(job.bases, job.overrides))
    theirs = config_leaves(trained_config(run))
    keys = (set(ours) | set(theirs)) - set(RESUMABLE)
    return sorted(k for k in keys if ours.get(k, "<unset>") != theirs.get(k, "<unset>"))


def train_job(job: Job) -> Path | None:
    """Train, resume or skip the job's run; its folder, or None if training failed."""
    run = latest_run(job)
    device = ["--device", job.device] if job.device else []
    if run is None:
        argv = ["-b", *job.bases, "-t", "-l", job.logdir, "-n", job.run_name, *device]
    else:
        changed = changed_settings(job, run)
        if changed:
            keys = ", ".join(changed[:4])
            print(
                f"{job.name}: {run} was trained with other settings ({keys}): remove it, or "
                "sweep into another --out",
                file=sys.stderr,
            )
            return None
        if trained_steps(run) >= job.max_steps:
            print(f"{job.name}: trained ({job.max_steps} steps) in {run}", flush=True)
            return run
        argv = ["-r", str(run), "-t", *device]
    if train_main.main([*argv, *job.overrides]) != 0:
        return None
    return latest_run(job)


def evaluate_job(job: Job, run: Path, networks: Any = None) -> bool:
    """Measure the run with its target and record the figures in its summary; False (with one
    line) if that failed. `networks`: the target's, or None to build them here."""
    try:
        networks = job.target.load(job.device) if networks is None else networks
        figures = job.target.evaluate(networks, run, job.subject, job.device)
        record_evaluation(run, trained_config(run), figures)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        print(f"{job.name}: evaluation failed: {one_line(e)}", file=sys.stderr)
        return False
    shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
    print(f"{job.name}: evaluated: {shown}", flush=True)
    return True


def run_job(job: Job, networks: Any = None) -> bool:
    """Train (or skip), then evaluate; False if either failed. Raises Stopped."""
    if job.error is not None:
        print(f"{job.name}: {job.error}", file=sys.stderr)
        return False
    run = train_job(job)
    if run is None:
        return False
    if trained_steps(run) < job.max_steps:
        raise Stopped(job.name)
    return job.target is None or evaluate_job(job, run, networks)


def run_in_process(jobs: Sequence[Job], networks: Any) -> tuple[set[str], bool]:
    """One job after another, in this process (training's stop signals need the main thread).
    Returns (names of failed jobs, whether a stop signal ended the sweep)."""
    failed = set()
    for job in jobs:
        try:
            ok = run_job(job, networks)
        except (Stopped, KeyboardInterrupt):
            return failed, True
        except Exception:  # an internal error in one run: report it and go on with the others
            traceback.print_exc()
            ok = False
        if not ok:
            failed.add(job.name)
    return failed, False


def folder_full(job: Job) -> bool:
    root = Path(job.class_root)
    return root.is_dir() and sum(1 for p in root.glob("prior_*.png")) >= job.class_images


def run_queue(
    jobs: Sequence[Job],
    gpus: Sequence[int],
    launch: Callable[[Job, int], bool],
    stop: threading.Event | None = None,
) -> set[str]:
    """One worker per GPU, each taking the next job; a job whose class-image folder is not yet
    full waits while another job fills it (two runs sampling into one folder would race on its
    files). No job starts once `stop` is set. Returns the names of the failed jobs."""
    pending, filling, failed = list(jobs), set(), set()
    stop = stop or threading.Event()
    cond = threading.Condition()

    def take() -> Job | None:
        with cond:
            while pending and not stop.is_set():
                for job in pending:
                    if job.class_root is None or job.class_root not in filling:
                        pending.remove(job)
                        if job.class_root is not None and not folder_full(job):
                            filling.add(job.class_root)
                        return job
                cond.wait(timeout=POLL_S)  # woken when a job ends; the timeout re-checks folders
                full = {j.class_root for j in pending if j.class_root and folder_full(j)}
                filling.difference_update(full)
            return None

    def worker(gpu: int) -> None:
        while (job := take()) is not None:
            ok = False
            try:
                ok = launch(job, gpu)
            finally:
                with cond:
                    filling.discard(job.class_root)
                    if not ok:
                        failed.add(job.name)
                    cond.notify_all()

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed


def run_on_gpus(jobs: Sequence[Job], gpus: Sequence[int], out: Path) -> tuple[set[str], bool]:
    """The queue, each job in its own process on one GPU (its output in OUT/logs/). A stop
    signal reaches the running jobs, which save and exit, and no new job starts."""
    stop, children, lock = threading.Event(), set(), threading.Lock()

    def launch(job: Job, gpu: int) -> bool:
        log = out / "logs" / f"{job.run_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"GPU {gpu}: {job.name} (log: {log})", flush=True)
        command = [sys.executable, str(SCRIPT), "--job", job_to_json(job)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        with open(log, "w") as f, lock:
            child = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)
            children.add(child)
        code = child.wait()
        with lock:
            children.discard(child)
        ok = code == 0 or stop.is_set()  # a job stopped during its set-up did not fail
        outcome = "stopped" if stop.is_set() else "done" if ok else f"FAILED (see {log})"
        print(f"GPU {gpu}: {job.name} {outcome}", flush=True)
        return ok

    def handle(signum, frame) -> None:
        stop.set()
        with lock:
            for child in children:
                child.send_signal(signum)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        failed = run_queue(jobs, gpus, launch, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return failed, stop.is_set()


def run_jobs(jobs, gpus, out: Path, networks: Any = None) -> tuple[set[str], bool]:
    """Run the jobs (on `gpus`, or here with the targets' `networks`); (names of failed jobs,
    stopped by a signal)."""
    if gpus:
        return run_on_gpus(jobs, gpus, out)
    return run_in_process(jobs, networks)


def status_of(job: Job, failed: set[str]) -> dict:
    """A job's row: its run folder, state and summary (final metrics)."""
    run = latest_run(job)
    if job.error is not None:
        status = "config error"
    elif job.name in failed:
        status = "failed"
    elif run is None:
        status = "not run"
    else:
        status = "done" if trained_steps(run) >= job.max_steps else "stopped"
    summary = read_summary(run) if run is not None else {}
    return {
        "name": job.name,
        "labels": dict(job.labels),
        "status": status,
        "run": None if run is None else str(run),
        "summary": summary,
    }


def evaluation_figures(summary: dict, metrics: Sequence[str]) -> dict[str, float] | None:
    """The evaluation figures in a run's summary (NaN where one is missing), or None."""
    if not any(key.startswith("eval/") for key in summary):
        return None
    values = {m: summary.get(f"eval/{m}") for m in metrics}
    return {m: math.nan if v is None else float(v) for m, v in values.items()}
