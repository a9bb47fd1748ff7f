r"""Sweeps: train, and evaluate if asked, every combination of a grid of config overrides.

    python scripts/sweep.py -b configs/dreambooth/v1-finetune_unfrozen.yaml \
        --actual_resume sd-v1-5.ckpt data.instance_root=photos/ data.class_word=dog \
        --grid train.lr=1e-6,5e-6 train.max_steps=400,800 [--random 3] [--gpus 0,1] \
        [--evaluate --real_dir photos/ --class_word dog (scripts/evaluate.py flags)]

`--grid` takes every argument after it, each `key=v1,v2,...` (commas inside brackets stay
together: `train.trainable=[unet],[unet,text_encoder]`); `key=value` arguments before it hold
for every run. `--random N` runs N of the combinations, drawn with `--seed`. A run is named after
its grid values (`lr=1e-6_max_steps=400`) and its folder is OUT/runs/<name>/<stamp>_<name>/.

Rerunning the same command skips finished runs, resumes stopped ones (from last.ckpt) and runs
the rest, so a sweep can be stopped (Ctrl-C, SIGTERM) at any time. A run that fails is reported
and the others go on; a run folder trained with other settings is refused, not reused.

Runs go one after another in this process, or with --gpus one process per GPU from a queue
(logs in OUT/logs/). `--evaluate` measures each run's last.ckpt against a target
(scripts/targets.py) with scripts/evaluate.py: a DreamBench subject (`--subject dog
--dreambench_root ...`) or your own photos (`--real_dir ... --class_word ...`); other unknown
`--flags` go to evaluate.py. At the end a table of the runs' final metrics (each run's
summary.json: step, training and validation loss, and the evaluation figures) is printed and
written to OUT/sweep.md and OUT/sweep.json. scripts/ablate.py is a sweep through the same code.
"""

import argparse
import itertools
import random
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# main.py and scripts/ sit at the repository root, beside (not inside) the installed ldm package.
sys.path.insert(0, str(ROOT))

from ldm.eval.report import write_report  # noqa: E402
from ldm.train.distributed import parse_gpus  # noqa: E402
from scripts.runner import (  # noqa: E402
    Job,
    Stopped,
    fail,
    finish,
    job_from_json,
    load_networks,
    make_job,
    run_job,
    run_jobs,
    split_args,
    status_of,
)
from scripts.targets import Target, add_target_arguments, names_target, target_of  # noqa: E402

UNSAFE = re.compile(r"[^\w.+=-]+")  # what a run name (a folder name) does not keep
LOSSES = ("train/loss", "val/loss", "val/best_loss")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # unknown --flags belong to evaluate.py
    )
    p.add_argument("-b", "--base", nargs="+", default=[], help="configs, merged in order")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="the swept keys")
    p.add_argument("--random", type=int, help="run N combinations drawn at random")
    p.add_argument("--seed", type=int, default=0, help="the draw of --random")
    p.add_argument("--actual_resume", help="base weights (train.actual_resume)")
    p.add_argument("--out", default="outputs/sweep", help="the sweep's folder")
    p.add_argument("--gpus", help="e.g. 0,1: one run per GPU at a time")
    p.add_argument("--device", help="cpu or cuda, for training and evaluation")
    p.add_argument("--evaluate", action="store_true", help="measure each run against a target")
    add_target_arguments(p, several=False)
    p.add_argument("--job", help=argparse.SUPPRESS)  # one job, as JSON: a GPU worker's command
    return p


def split_values(text: str) -> list[str]:
    """'1e-6,[unet,text_encoder]' -> ['1e-6', '[unet,text_encoder]']: commas at depth 0 only."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`key=v1,v2` arguments -> [(key, [v1, v2])]."""
    axes = []
    for item in items:
        key, sep, text = item.partition("=")
        values = split_values(text)
        if not sep or not key or "" in values:
            raise ValueError(f"--grid {item}: expected key=value1,value2,...")
        if key in (k for k, _ in axes):
            raise ValueError(f"--grid: {key} appears twice")
        axes.append((key, values))
    return axes


def combinations(axes, n_random: int | None, seed: int) -> list[list[tuple[str, str]]]:
    """Every combination of the grid in order, or `n_random` of them (the same on a rerun)."""
    keys = [key for key, _ in axes]
    combos = [list(zip(keys, values)) for values in itertools.product(*(v for _, v in axes))]
    if n_random is None or n_random >= len(combos):
        return combos
    if n_random < 1:
        raise ValueError("--random must be at least 1")
    return [combos[i] for i in sorted(random.Random(seed).sample(range(len(combos)), n_random))]


def run_name(combo: list[tuple[str, str]]) -> str:
    """`lr=1e-6_max_steps=400`: each key's last part (the whole key where two share it)."""
    lasts = [key.rsplit(".", 1)[-1] for key, _ in combo]
    parts = []
    for (key, value), last in zip(combo, lasts):
        label = last if lasts.count(last) == 1 else key
        value = UNSAFE.sub("-", value.strip("[](){}'\" ").replace(",", "+"))
        parts.append(f"{label}={value}")
    return "_".join(parts)


def plan(opt: argparse.Namespace, overrides: list[str], target: Target | None) -> list[Job]:
    if not opt.base:
        raise ValueError("pass the configs with -b/--base")
    axes = parse_grid(opt.grid)
    if not axes:
        raise ValueError("pass the swept keys with --grid key=value1,value2 ...")
    fixed = [*overrides]
    if opt.actual_resume:
        fixed.insert(0, f"train.actual_resume={opt.actual_resume}")
    subject = None
    if target is not None:
        (subject, *more) = target.subjects(Path(opt.out))
        if more:
            raise ValueError("--evaluate measures every run against one subject")
    jobs, names = [], {}
    for combo in combinations(axes, opt.random, opt.seed):
        name = run_name(combo)
        if name in names:
            raise ValueError(f"grid values {names[name]} and {combo} give one run name {name}")
        names[name] = combo
        grid = [f"{k}={v}" for k, v in combo]
        logdir = Path(opt.out) / "runs" / name
        args = (opt.base, [*fixed, *grid], logdir, target, subject, opt.device)
        jobs.append(make_job(name, combo, *args))
    return jobs


def number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def table(jobs: list[Job], rows: list[dict], target: Target | None) -> str:
    """Markdown: one row per run, its grid values, status, step and final metrics (with the
    target's figures when it evaluated the runs)."""
    keys = list(dict.fromkeys(k for job in jobs for k, _ in job.labels))
    figures = target.metrics if target is not None else ()
    metrics = [*LOSSES, *(f"eval/{m}" for m in figures)]
    headers = target.headers if target is not None else {}
    heads = [*keys, "status", "step", *(headers.get(m[5:], m) for m in metrics)]
    align = ["---"] * (len(keys) + 1) + ["---:"] * (len(heads) - len(keys) - 1)
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
    for job, row in zip(jobs, rows):
        labels = dict(job.labels)
        summary = row["summary"]
        cells = [labels.get(k, "") for k in keys] + [row["status"], str(summary.get("step", "–"))]
        cells += [number(summary.get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, networks: Any = None) -> int:
    """Exit code: 0, or 1 if a run failed. `networks` replaces the target's measuring networks
    built from the weight flags (tests pass tiny ones)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opt, rest = parser().parse_known_args(argv)
    if opt.job:  # a GPU worker: one job, in this process
        try:
            return 0 if run_job(job_from_json(opt.job)) else 1
        except Stopped:
            return 0  # the run saved its checkpoint; the parent sees it unfinished
    # -b takes several files, so it swallows overrides that follow it: hand those back.
    overrides, eval_flags = split_args([b for b in opt.base if "=" in b] + rest)
    opt.base = [b for b in opt.base if "=" not in b]
    try:
        if not opt.evaluate and (eval_flags or names_target(opt)):
            given = " ".join(eval_flags) or "--subject, --dreambench_root, --real_dir, --class_word"
            raise ValueError(f"evaluation flags need --evaluate: {given}")
        target = target_of(opt, eval_flags) if opt.evaluate else None
        jobs = plan(opt, overrides, target)
        gpus = parse_gpus(opt.gpus, opt.device)
        if target is not None:
            networks = load_networks(target, gpus, opt.device, networks)
    except (ValueError, OSError, RuntimeError) as e:
        return fail("sweep.py", e)
    failed, stopped = run_jobs(jobs, gpus, Path(opt.out), networks)
    rows = [status_of(job, failed) for job in jobs]
    markdown = table(jobs, rows, target)
    write_report(opt.out, {"bases": opt.base, "grid": opt.grid, "runs": rows}, markdown, "sweep")
    print(markdown)
    return finish("sweep.py", failed, stopped)


if __name__ == "__main__":
    sys.exit(main())
