r"""The paper's ablations in your setting: train and evaluate each variant on chosen subjects.

    python scripts/ablate.py -b configs/dreambooth/v1-finetune_unfrozen.yaml \
        --actual_resume sd-v1-5.ckpt --dreambench_root data/dreambench --subjects dog,backpack \
        --variants prior,no_prior,no_class,wrong_class,text_encoder --gpus 0,1 \
        [scripts/evaluate.py flags: --dino_weights ... --n_samples 4 ...] [train.max_steps=800 ...]
    python scripts/ablate.py -b ... --real_dir photos/rex --class_word dog [--variants ...]
    python scripts/ablate.py -b configs/dreambooth/demo.yaml --toy_subjects ball,box,cup \
        [--ddim_steps 25 --n_samples 8 --n_class_images 32]

A variant is a config in configs/ablations/ (those above, or one of your own) merged after the
base configs and a per-subject config (its photos, class noun and other data settings);
`key=value` arguments come last. The subjects come from an evaluation target
(scripts/targets.py): DreamBench subjects (--subjects with --dreambench_root) or your own photos
(--real_dir with --class_word), measured by scripts/evaluate.py, whose flags pass through, or the
toy world's subjects (--toy_subjects, measured by its evaluator; README "The toy world"); the
target's `evaluate` measures each run, and `targets.target_of` is where another kind plugs in.
The wrong class noun is the target's choice for each subject ("can", or "backpack" for a can;
in the toy world the next class: ball -> box -> cup -> ball); --wrong_class sets another. Run folders go to OUT/runs/<subject>/<variant>/. Prior-preservation
class images are sampled once per class noun into OUT/class_images/<noun>/ and shared by the runs
that use that noun.

The runs are a sweep through scripts/sweep.py's runner (scripts/runner.py): one after another,
or with --gpus 0,1,2 one process per GPU from a queue (output in OUT/logs/); a rerun skips
finished trainings, resumes unfinished ones and reuses generated images. At the end the mean
over subjects of each variant is printed beside the paper's Table 3 (prior preservation) and
Table 4 (class noun), with a text-encoder table, and written to OUT/ablation.md and .json.
"""

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# main.py and scripts/ sit at the repository root, beside (not inside) the installed ldm package.
sys.path.insert(0, str(ROOT))

from ldm.checkpoint import save_text  # noqa: E402
from ldm.eval.report import json_safe, markdown_table, write_report  # noqa: E402
from ldm.train.config import load_config  # noqa: E402
from ldm.train.distributed import parse_gpus  # noqa: E402
from scripts.runner import (  # noqa: E402
    Job,
    evaluation_figures,
    fail,
    finish,
    load_networks,
    make_job,
    run_jobs,
    split_args,
    status_of,
)
from scripts.targets import Target, TargetSubject, add_target_arguments, target_of  # noqa: E402

ABLATIONS = ROOT / "configs" / "ablations"
# (key of the target's paper rows, title, the target's columns: all or "subject" fidelity only,
# [(variant, row label)]); the first variant is the reference.
TABLES = (
    ("prior", "Table 3: prior preservation", "all",
     [("prior", "with prior preservation"), ("no_prior", "without prior preservation")]),
    ("class_noun", "Table 4: class noun", "subject",
     [("prior", "correct class noun"), ("no_class", "no class noun"),
      ("wrong_class", "wrong class noun")]),
    ("text_encoder", "Text encoder", "all",
     [("prior", "UNet trained"), ("text_encoder", "UNet and text encoder trained")]),
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
    add_target_arguments(p, several=True)
    p.add_argument("--variants", default=None, help="comma-separated (default: all)")
    p.add_argument("--wrong_class", help="the wrong class noun for every subject")
    p.add_argument("--out", default="outputs/ablations")
    p.add_argument("--gpus", help="e.g. 0,1,2: one run per GPU at a time")
    p.add_argument("--device", help="cpu or cuda, for training and evaluation")
    return p


def available_variants() -> list[str]:
    return sorted(p.stem for p in ABLATIONS.glob("*.yaml"))


def wrong_class(target: Target, subject: TargetSubject, choice: str | None) -> str:
    if choice is None:
        return target.wrong_class(subject)
    if choice == subject.class_word:
        raise ValueError(f"--wrong_class {choice} is the class of subject {subject.name}")
    return choice


def subject_config(out: Path, subject: TargetSubject) -> Path:
    """OUT/subjects/<name>.yaml: the subject's data settings (photos, class noun, ...), merged
    before a variant."""
    path = out / "subjects" / f"{subject.name}.yaml"
    text = OmegaConf.to_yaml(OmegaConf.create({"data": subject.data_config()}))
    # Written only when it changes: GPU workers read it while others may be starting.
    if not path.is_file() or path.read_text() != text:
        save_text(text, path)
    return path


def plan_job(
    target: Target,
    subject: TargetSubject,
    variant: str,
    opt: argparse.Namespace,
    overrides: list[str],
) -> Job:
    """One variant on one subject: its configs and overrides, checked as main.py will load
    them, and the target that measures its run."""
    out = Path(opt.out)
    bases = (*opt.base, str(subject_config(out, subject)), str(ABLATIONS / f"{variant}.yaml"))
    extra = list(overrides)
    if variant == "wrong_class":  # before the user's overrides, which may still set it
        extra.insert(0, f"data.class_word={wrong_class(target, subject, opt.wrong_class)}")
    if opt.actual_resume:
        extra.insert(0, f"train.actual_resume={opt.actual_resume}")
    if not any(o.startswith("data.class_root=") for o in overrides):
        noun = "_".join(load_config(bases, extra).data.class_word.split()) or "no_class_noun"
        extra.append(f"data.class_root={(out / 'class_images' / noun).resolve()}")
    labels = [("subject", subject.name), ("variant", variant)]
    logdir = out / "runs" / subject.name / variant
    name = f"{subject.name}/{variant}"
    return make_job(name, labels, bases, extra, logdir, target, subject, opt.device)


def collect(jobs: Sequence[Job], target: Target) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {subject: metrics}} from the runs' summaries (what the target measured)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for job in jobs:
        labels = dict(job.labels)
        metrics = evaluation_figures(status_of(job, set())["summary"], target.metrics)
        if metrics is not None:
            results.setdefault(labels["variant"], {})[labels["subject"]] = metrics
    return results


def mean_over_subjects(
    per_subject: dict[str, dict[str, float]], metrics: Sequence[str]
) -> dict[str, float]:
    """Each metric's mean over the subjects that have it (PRES and DIV may be NaN)."""
    means = {}
    for metric in metrics:
        values = [m[metric] for m in per_subject.values() if not math.isnan(m[metric])]
        means[metric] = sum(values) / len(values) if values else math.nan
    return means


def summary(results: dict[str, dict[str, dict[str, float]]], target: Target) -> str:
    """Markdown: every variant, then each paper table whose ablated variant ran."""
    means = {v: mean_over_subjects(runs, target.metrics) for v, runs in results.items()}
    subjects = sorted({s for runs in results.values() for s in runs})
    parts = [
        f"# Ablations: mean over {len(subjects)} subject(s): {', '.join(subjects)}",
        markdown_table(list(means.items()), target.metrics, target.headers),
    ]
    for key, title, columns, rows in TABLES:
        if not any(variant in means for variant, _ in rows[1:]):
            continue
        metrics = target.subject_metrics if columns == "subject" else target.metrics
        ours = [(f"{label}, ours", means[v]) for v, label in rows if v in means]
        paper = list(target.paper.get(key, {}).items())
        parts += [f"## {title}", markdown_table([*ours, *paper], metrics, target.headers)]
    if target.notes:
        parts.append(target.notes)
    return "\n\n".join(parts)


def plan(opt: argparse.Namespace, target: Target, overrides: list[str]) -> list[Job]:
    variants = opt.variants.split(",") if opt.variants else available_variants()
    unknown = [v for v in variants if v not in available_variants()]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}: configs/ablations/ has "
            f"{', '.join(available_variants())}"
        )
    subjects = target.subjects(Path(opt.out))
    return [plan_job(target, s, v, opt, overrides) for s in subjects for v in variants]


def main(argv: list[str] | None = None, networks: Any = None, target: Target | None = None) -> int:
    """Exit code: 0, or 1 if anything failed. `networks` replaces the target's measuring
    networks built from the weight flags (tests pass tiny ones); `target` replaces the one the
    flags name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opt, rest = parser().parse_known_args(argv)
    overrides, eval_flags = split_args(rest)
    try:
        target = target or target_of(opt, eval_flags)
        jobs = plan(opt, target, overrides)
        gpus = parse_gpus(opt.gpus, opt.device)
        networks = load_networks(target, gpus, opt.device, networks)
    except (ValueError, OSError, RuntimeError) as e:
        return fail("ablate.py", e)
    failed, stopped = run_jobs(jobs, gpus, Path(opt.out), networks)
    results = collect(jobs, target)
    markdown = summary(results, target)
    means = {v: mean_over_subjects(runs, target.metrics) for v, runs in results.items()}
    data = {
        "target": target.kind,
        "subjects": list(dict.fromkeys(job.subject.name for job in jobs)),
        "runs": {v: {s: json_safe(m) for s, m in runs.items()} for v, runs in results.items()},
        "means": {v: json_safe(m) for v, m in means.items()},
        "failed": sorted(failed),
        "paper": target.paper,
    }
    write_report(opt.out, data, markdown, name="ablation")
    print(markdown)
    return finish("ablate.py", failed, stopped)


if __name__ == "__main__":
    sys.exit(main())
