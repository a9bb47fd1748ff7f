r"""The paper's ablations in your setting: train and evaluate each variant on chosen subjects.

    python scripts/ablate.py -b configs/dreambooth/v1-finetune_unfrozen.yaml \
        --actual_resume sd-v1-5.ckpt --dreambench_root data/dreambench --subjects dog,backpack \
        --variants prior,no_prior,no_class,wrong_class,text_encoder --gpus 0,1 \
        [scripts/evaluate.py flags: --dino_weights ... --n_samples 4 ...] [train.max_steps=800 ...]
    python scripts/ablate.py -b ... --real_dir photos/rex --class_word dog [--variants ...]

A variant is a config in configs/ablations/ (those above, or one of your own) merged after the
base configs and a per-subject config (its photos and class noun); `key=value` arguments come
last. The subjects are the evaluation targets: DreamBench subjects (--subjects with
--dreambench_root) or your own photos (--real_dir with --class_word); `targets()` is where
another kind of target plugs in. The wrong class noun depends on the subject: "can", or
"backpack" for a can (--wrong_class sets another). Run folders go to
OUT/runs/<subject>/<variant>/, and each run is evaluated with scripts/evaluate.py, whose flags
pass through. Prior-preservation class images are sampled once per class noun into
OUT/class_images/<noun>/ and shared by the runs that use that noun.

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
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# main.py and scripts/ sit at the repository root, beside (not inside) the installed ldm package.
sys.path.insert(0, str(ROOT))

from ldm.eval.dreambench import Subject, custom_subject, dreambench_subject  # noqa: E402
from ldm.eval.metrics import Evaluator  # noqa: E402
from ldm.eval.report import (  # noqa: E402
    METRICS,
    PAPER_TABLE3,
    PAPER_TABLE4,
    json_safe,
    markdown_table,
    write_report,
)
from ldm.train.config import load_config  # noqa: E402
from ldm.train.distributed import parse_gpus  # noqa: E402
from scripts.runner import (  # noqa: E402
    Job,
    check_eval_flags,
    evaluation_figures,
    evaluator_for,
    fail,
    finish,
    make_job,
    run_jobs,
    split_args,
    status_of,
)

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
    p.add_argument("--dreambench_root", help="the folder of DreamBench subject folders")
    p.add_argument("--subjects", help="DreamBench subjects, comma-separated, e.g. dog,backpack")
    p.add_argument("--real_dir", help="or your own subject's photos (with --class_word)")
    p.add_argument("--class_word", help="your subject's class noun, e.g. dog")
    p.add_argument("--variants", default=None, help="comma-separated (default: all)")
    p.add_argument("--wrong_class", help="the wrong class noun for every subject")
    p.add_argument("--out", default="outputs/ablations")
    p.add_argument("--gpus", help="e.g. 0,1,2: one run per GPU at a time")
    p.add_argument("--device", help="cpu or cuda, for training and evaluation")
    return p


def available_variants() -> list[str]:
    return sorted(p.stem for p in ABLATIONS.glob("*.yaml"))


@dataclass(frozen=True)
class Target:
    """What a variant trains on and is evaluated against."""

    subject: Subject  # its name, class noun and photos
    eval_args: tuple[str, ...]  # the scripts/evaluate.py flags that name it


def targets(opt: argparse.Namespace) -> list[Target]:
    """The evaluation targets the flags name: DreamBench subjects, or your own photos."""
    if opt.subjects and opt.real_dir:
        raise ValueError("pass --subjects (DreamBench) or --real_dir, not both")
    if opt.subjects:
        if not opt.dreambench_root:
            raise ValueError("--subjects needs --dreambench_root, the folder of subject folders")
        root = opt.dreambench_root
        names = [s for s in opt.subjects.split(",") if s]
        return [
            Target(dreambench_subject(n, root), ("--subject", n, "--dreambench_root", root))
            for n in names
        ]
    if opt.real_dir and opt.class_word:
        subject = custom_subject(opt.real_dir, opt.class_word)
        return [Target(subject, ("--real_dir", opt.real_dir, "--class_word", opt.class_word))]
    raise ValueError("pass --subjects with --dreambench_root, or --real_dir with --class_word")


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


def plan_job(
    target: Target, variant: str, opt: argparse.Namespace, overrides: list[str], eval_flags=()
) -> Job:
    """One variant on one target: its configs and overrides, checked as main.py will load them."""
    subject = target.subject
    out = Path(opt.out)
    bases = (*opt.base, str(subject_config(out, subject)), str(ABLATIONS / f"{variant}.yaml"))
    extra = list(overrides)
    if variant == "wrong_class":  # before the user's overrides, which may still set it
        extra.insert(0, f"data.class_word={wrong_class(subject, opt.wrong_class)}")
    if opt.actual_resume:
        extra.insert(0, f"train.actual_resume={opt.actual_resume}")
    if not any(o.startswith("data.class_root=") for o in overrides):
        noun = "_".join(load_config(bases, extra).data.class_word.split()) or "no_class_noun"
        extra.append(f"data.class_root={(out / 'class_images' / noun).resolve()}")
    labels = [("subject", subject.name), ("variant", variant)]
    logdir = out / "runs" / subject.name / variant
    eval_args = [*target.eval_args, *eval_flags]
    return make_job(
        f"{subject.name}/{variant}", labels, bases, extra, logdir, eval_args, opt.device
    )


def collect(jobs: Sequence[Job]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {subject: metrics}} from the runs' summaries (what evaluate.py recorded)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for job in jobs:
        labels = dict(job.labels)
        metrics = evaluation_figures(status_of(job, set())["summary"], METRICS)
        if metrics is not None:
            results.setdefault(labels["variant"], {})[labels["subject"]] = metrics
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


def plan(opt: argparse.Namespace, overrides: list[str], eval_flags: list[str]) -> list[Job]:
    variants = opt.variants.split(",") if opt.variants else available_variants()
    unknown = [v for v in variants if v not in available_variants()]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}: configs/ablations/ has "
            f"{', '.join(available_variants())}"
        )
    return [plan_job(t, v, opt, overrides, eval_flags) for t in targets(opt) for v in variants]


def main(argv: list[str] | None = None, evaluator: Evaluator | None = None) -> int:
    """Exit code: 0, or 1 if anything failed. `evaluator` replaces the networks built from the
    weight flags (tests pass tiny ones)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opt, rest = parser().parse_known_args(argv)
    overrides, eval_flags = split_args(rest)
    try:
        eval_opt = check_eval_flags(eval_flags, OWN_EVAL_FLAGS)
        jobs = plan(opt, overrides, eval_flags)
        gpus = parse_gpus(opt.gpus)
        evaluator = evaluator_for(eval_opt, gpus, opt.device, evaluator)
    except (ValueError, OSError, RuntimeError) as e:
        return fail("ablate.py", e)
    failed, stopped = run_jobs(jobs, gpus, Path(opt.out), evaluator)
    results = collect(jobs)
    markdown = summary(results)
    data = {
        "subjects": [t.subject.name for t in targets(opt)],
        "runs": {v: {s: json_safe(m) for s, m in runs.items()} for v, runs in results.items()},
        "means": {v: json_safe(mean_over_subjects(runs)) for v, runs in results.items()},
        "failed": sorted(failed),
        "paper": {"table3": PAPER_TABLE3, "table4": PAPER_TABLE4},
    }
    write_report(opt.out, data, markdown, name="ablation")
    print(markdown)
    return finish("ablate.py", failed, stopped)


if __name__ == "__main__":
    sys.exit(main())
