r"""The paper's ablations in your setting: train and evaluate each variant on chosen subjects.

    python scripts/ablate.py -b configs/dreambooth/v1-finetune_unfrozen.yaml \
        --actual_resume sd-v1-5.ckpt --dreambench_root data/dreambench --subjects dog,backpack \
        --variants prior,no_prior,no_class,wrong_class,text_encoder --gpus 0,1 \
        [scripts/evaluate.py flags: --dino_weights ... --n_samples 4 ...] [train.max_steps=800 ...]

A variant is a config in configs/ablations/ (those above, or one of your own) merged after the
base configs and a per-subject config (its photos and class noun); `key=value` arguments come
last. The wrong class noun depends on the subject: "can", or "backpack" for a can (--wrong_class
sets another). Run folders go to OUT/runs/<subject>/<variant>/, and each run is evaluated with
scripts/evaluate.py, whose flags pass through. A rerun skips finished trainings, resumes
unfinished ones and reuses generated images. Prior-preservation class images are sampled once
per class noun into OUT/class_images/<noun>/ and shared by the runs that use that noun.

Runs go one after another, or with --gpus 0,1,2 one process per GPU from a job queue (its output
in OUT/logs/). At the end the mean over subjects of each variant is printed beside the paper's
Table 3 (prior preservation) and Table 4 (class noun), with a text-encoder table, and written
to OUT/ablation.md and OUT/ablation.json.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# main.py and scripts/ sit at the repository root, beside (not inside) the installed ldm package.
sys.path.insert(0, str(ROOT))

import main as train_main  # noqa: E402
from ldm.checkpoint import read_checkpoint  # noqa: E402
from ldm.eval.dreambench import Subject, dreambench_subject  # noqa: E402
from ldm.eval.metrics import Evaluator  # noqa: E402
from ldm.eval.report import (  # noqa: E402
    METRICS,
    PAPER_TABLE3,
    PAPER_TABLE4,
    from_json,
    json_safe,
    markdown_table,
    write_report,
)
from ldm.train.config import load_config, uses_prior  # noqa: E402
from ldm.train.distributed import parse_gpus  # noqa: E402
from ldm.train.state import RunDir  # noqa: E402
from scripts import evaluate  # noqa: E402

ABLATIONS = ROOT / "configs" / "ablations"
WRONG_CLASSES = ("can", "backpack")  # the paper's example, and a stand-in for the can subject
# evaluate.py flags that ablate.py sets for each run itself.
OWN_EVAL_FLAGS = (
    "ckpt",
    "config",
    "subject",
    "dreambench_root",
    "real_dir",
    "class_word",
    "outdir",
)
# (title, metrics, [(variant, row label)], paper rows); the first variant is the reference.
TABLES = (
    (
        "Table 3: prior preservation",
        METRICS,
        [("prior", "with prior preservation"), ("no_prior", "without prior preservation")],
        PAPER_TABLE3,
    ),
    (
        "Table 4: class noun",
        ("dino", "clip_i"),
        [("prior", "correct class noun"), ("no_class", "no class noun"), ("wrong_class", "wrong class noun")],
        PAPER_TABLE4,
    ),
    (
        "Text encoder",
        METRICS,
        [("prior", "UNet trained"), ("text_encoder", "UNet and text encoder trained")],
        {},
    ),
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    # No abbreviations: evaluate.py's --subject would be taken for --subjects.
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("-b", "--base", nargs="+", required=True, help="base configs, merged in order")
    p.add_argument("--actual_resume", help="base weights (.ckpt / .safetensors)")
    p.add_argument("--dreambench_root", required=True, help="the folder of subject folders")
    p.add_argument("--subjects", required=True, help="comma-separated, e.g. dog,backpack")
    p.add_argument("--variants", default=None, help="comma-separated (default: all)")
    p.add_argument("--wrong_class", help="the wrong class noun for every subject")
    p.add_argument("--out", default="outputs/ablations")
    p.add_argument("--gpus", help="e.g. 0,1,2: one run per GPU at a time")
    p.add_argument("--device", help="cpu or cuda, for training and evaluation")
    # A GPU worker's own runs: the parent writes the summary of all of them.
    p.add_argument("--no_summary", action="store_true", help=argparse.SUPPRESS)
    return p


def available_variants() -> list[str]:
    return sorted(p.stem for p in ABLATIONS.glob("*.yaml"))


@dataclass(frozen=True)
class Job:
    subject: Subject
    variant: str
    bases: tuple[str, ...]
    overrides: tuple[str, ...]
    logdir: Path  # its run folder is the newest `<stamp>_<variant>` in here
    max_steps: int
    class_root: str | None  # the class-image folder it samples into; None without prior

    @property
    def name(self) -> str:
        return f"{self.subject.name}/{self.variant}"


def split_args(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    """Arguments ablate.py does not know: (`key=value` training overrides, evaluate.py flags)."""
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    return overrides, [a for a in rest if a not in overrides]


def wrong_class(subject: Subject, choice: str | None) -> str:
    if choice is None:
        return next(w for w in WRONG_CLASSES if w != subject.class_word)
    if choice == subject.class_word:
        raise ValueError(f"--wrong_class {choice} is the class of subject {subject.name}")
    return choice


def subject_config(out: Path, subject: Subject) -> Path:
    """OUT/subjects/<name>.yaml: the subject's photos and class noun, merged before a variant."""
    path = out / "subjects" / f"{subject.name}.yaml"
    data = {"instance_root": str(subject.real_dir.resolve()), "class_word": subject.class_word}
    text = OmegaConf.to_yaml(OmegaConf.create({"data": data}))
    # Written only when it changes: GPU workers read it while others may be starting.
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def plan_job(name: str, variant: str, opt: argparse.Namespace, overrides: list[str]) -> Job:
    """The configs and overrides of one run, checked as main.py will load them."""
    subject = dreambench_subject(name, opt.dreambench_root)
    out = Path(opt.out)
    bases = (*opt.base, str(subject_config(out, subject)), str(ABLATIONS / f"{variant}.yaml"))
    extra = list(overrides)
    if variant == "wrong_class":  # before the user's overrides, which may still set it
        extra.insert(0, f"data.class_word={wrong_class(subject, opt.wrong_class)}")
    flags = {"train.actual_resume": opt.actual_resume}
    cfg = load_config(bases, extra, flags)
    if not any(o.startswith("data.class_root=") for o in overrides):
        noun = "_".join(cfg.data.class_word.split()) or "no_class_noun"
        extra.append(f"data.class_root={(out / 'class_images' / noun).resolve()}")
        cfg = load_config(bases, extra, flags)
    class_root = cfg.data.class_root if uses_prior(cfg) else None
    logdir = out / "runs" / name / variant
    return Job(subject, variant, bases, tuple(extra), logdir, cfg.train.max_steps, class_root)


def latest_run(job: Job) -> Path | None:
    runs = sorted(job.logdir.glob(f"*_{job.variant}")) if job.logdir.is_dir() else []
    return runs[-1] if runs else None


def train(job: Job, opt: argparse.Namespace) -> Path | None:
    """Train, resume or skip the job's run; returns its folder, or None if training failed."""
    run = latest_run(job)
    device = ["--device", opt.device] if opt.device else []
    if run is not None and RunDir(run).last.is_file():
        step = int(read_checkpoint(RunDir(run).last)[1].get("global_step", 0))
        if step >= job.max_steps:
            print(f"{job.name}: trained ({step} steps) in {run}", flush=True)
            return run
        argv = ["-r", str(run), "-t", *device, *job.overrides]
    else:
        weights = ["--actual_resume", opt.actual_resume] if opt.actual_resume else []
        argv = ["-b", *job.bases, "-t", "-l", str(job.logdir), "-n", job.variant]
        argv += [*weights, *device, *job.overrides]
    if train_main.main(argv) != 0:
        return None
    return latest_run(job)


def report_path(job: Job) -> Path | None:
    run = latest_run(job)
    if run is None:
        return None
    return evaluate.default_outdir(RunDir(run).last, job.subject.name) / "report.json"


def run_job(job: Job, opt: argparse.Namespace, eval_flags: list[str], evaluator: Evaluator) -> bool:
    """Train (or skip), then evaluate; False if either failed."""
    run = train(job, opt)
    if run is None:
        return False
    device = ["--device", opt.device] if opt.device else []
    argv = ["--ckpt", str(run), "--subject", job.subject.name]
    argv += ["--dreambench_root", opt.dreambench_root, *device, *eval_flags]
    return evaluate.main(argv, evaluator) == 0


def run_queue(jobs: Sequence[Job], gpus: Sequence[int], launch: Callable[[Job, int], bool]):
    """One worker per GPU; each takes the next job whose class-image folder no running job is
    filling (two runs sampling into one folder would race on its files). Returns failed jobs."""
    pending, busy, failed = list(jobs), set(), []
    cond = threading.Condition()

    def take() -> Job | None:
        with cond:
            while pending:
                free = [j for j in pending if j.class_root is None or j.class_root not in busy]
                if free:
                    pending.remove(free[0])
                    busy.add(free[0].class_root)
                    return free[0]
                cond.wait()
            return None

    def worker(gpu: int) -> None:
        while (job := take()) is not None:
            ok = False
            try:
                ok = launch(job, gpu)
            finally:
                with cond:
                    busy.discard(job.class_root)
                    if not ok:
                        failed.append(job)
                    cond.notify_all()

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed


def launcher(argv: list[str], out: Path) -> Callable[[Job, int], bool]:
    """Run one job as `ablate.py ... --subjects S --variants V` on GPU `gpu`, logging to OUT/logs/."""
    common = argv
    for flag in ("--gpus", "--subjects", "--variants"):
        common = train_main.without_flag(common, flag)

    def launch(job: Job, gpu: int) -> bool:
        log = out / "logs" / f"{job.subject.name}-{job.variant}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"GPU {gpu}: {job.name} (log: {log})", flush=True)
        command = [sys.executable, __file__, *common]
        command += ["--subjects", job.subject.name, "--variants", job.variant, "--no_summary"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        with open(log, "w") as f:
            code = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        print(f"GPU {gpu}: {job.name} {'done' if code == 0 else f'FAILED (see {log})'}", flush=True)
        return code == 0

    return launch


def collect(jobs: Sequence[Job]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {subject: metrics}} from the runs' report.json files."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for job in jobs:
        path = report_path(job)
        if path is not None and path.is_file():
            metrics = from_json(json.loads(path.read_text())["metrics"])
            results.setdefault(job.variant, {})[job.subject.name] = metrics
    return results


def mean_over_subjects(per_subject: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the subjects that have it (PRES and DIV may be NaN)."""
    means = {}
    for metric in METRICS:
        values = [m[metric] for m in per_subject.values() if not math.isnan(m[metric])]
        means[metric] = sum(values) / len(values) if values else math.nan
    return means


def summary(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: every variant, then each paper table whose ablated variant ran."""
    means = {variant: mean_over_subjects(runs) for variant, runs in results.items()}
    subjects = sorted({s for runs in results.values() for s in runs})
    parts = [
        f"# Ablations: mean over {len(subjects)} subject(s): {', '.join(subjects)}",
        markdown_table(list(means.items())),
    ]
    for title, metrics, rows, paper in TABLES:
        if not any(variant in means for variant, _ in rows[1:]):
            continue
        ours = [(f"{label}, ours", means[v]) for v, label in rows if v in means]
        parts += [f"## {title}", markdown_table([*ours, *paper.items()], metrics)]
    parts.append(
        "The paper's ablations were run with Imagen, over the 30 DreamBench subjects. CLIP-T "
        "embeds the prompts without the identifier. Per-run reports: "
        "OUT/runs/<subject>/<variant>/<run>/eval/last/<subject>/report.md."
    )
    return "\n\n".join(parts)


def plan(opt: argparse.Namespace, overrides: list[str]) -> list[Job]:
    variants = opt.variants.split(",") if opt.variants else available_variants()
    unknown = [v for v in variants if v not in available_variants()]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}: configs/ablations/ has "
            f"{', '.join(available_variants())}"
        )
    subjects = [s for s in opt.subjects.split(",") if s]
    return [plan_job(s, v, opt, overrides) for s in subjects for v in variants]


def check_eval_flags(eval_flags: list[str]) -> argparse.Namespace:
    """evaluate.py's view of the flags passed through (argparse exits on an unknown one)."""
    eval_opt = evaluate.parser().parse_args(eval_flags)
    own = [f"--{f}" for f in OWN_EVAL_FLAGS if getattr(eval_opt, f) is not None]
    if own:
        raise ValueError(f"ablate.py sets {', '.join(own)} for each run itself")
    return eval_opt


def main(argv: list[str] | None = None, evaluator: Evaluator | None = None) -> int:
    """Exit code: 0, or 1 if anything failed. `evaluator` replaces the networks built from the
    weight flags (tests pass tiny ones)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opt, rest = parser().parse_known_args(argv)
    overrides, eval_flags = split_args(rest)
    try:
        eval_opt = check_eval_flags(eval_flags)
        jobs = plan(opt, overrides)
        gpus = parse_gpus(opt.gpus, opt.device)
        # Before any training, so that a missing weight file fails now; with GPU workers (which
        # build their own) only as that check, on the CPU.
        device = "cpu" if gpus else (opt.device or eval_opt.device)
        evaluator = evaluator or evaluate.build_evaluator(eval_opt, device)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"ablate.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    if gpus:
        failed = run_queue(jobs, gpus, launcher(argv, Path(opt.out)))
    else:
        failed = [job for job in jobs if not run_job(job, opt, eval_flags, evaluator)]
    if not opt.no_summary:
        results = collect(jobs)
        markdown = summary(results)
        data = {
            "subjects": [s for s in opt.subjects.split(",") if s],
            "runs": {v: {s: json_safe(m) for s, m in runs.items()} for v, runs in results.items()},
            "means": {v: json_safe(mean_over_subjects(runs)) for v, runs in results.items()},
            "failed": [job.name for job in failed],
            "paper": {"table3": PAPER_TABLE3, "table4": PAPER_TABLE4},
        }
        write_report(opt.out, data, markdown, name="ablation")
        print(markdown)
    if failed:
        print(f"ablate.py: failed: {', '.join(job.name for job in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
