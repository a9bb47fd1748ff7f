r"""Evaluate a DreamBooth run as in the paper: DINO, CLIP-I, CLIP-T, PRES and DIV of one subject.

    python scripts/evaluate.py --ckpt logs/2025-01-01T00-00-00_dog --subject dog \
        --dreambench_root data/dreambench
    python scripts/evaluate.py --ckpt run/checkpoints/best.ckpt --real_dir photos/ --class_word dog
    python scripts/evaluate.py --ckpt logs/2025-01-01T00-00-00_demo --toy_subject box

The toy world (`--toy_subject ball|box|cup`, see README "The toy world") is measured by its own
evaluator (ldm.eval.toy_runs: subject rate and similarity, subject colour, class, prompt
fidelity, PRES, DIV), on the CPU, from --n_samples (default 8) images of each of its 5 contexts
and --n_class_images (32) of the class prompt, --ddim_steps (50), --scale (5.0), --seed (0);
no images are written, and the figures of a run's last.ckpt go into the run's summary.

`--ckpt` is a run folder (its last.ckpt) or a checkpoint; its config comes from the checkpoint
(training checkpoints carry it) or `--config`. For each of the 25 DreamBench prompts of the
subject's kind (live or object) it generates `--n_samples` images, and `--n_class_images` of
"a [class noun]" for PRES, into `RUN/eval/<checkpoint>/<subject>/` with an `index.jsonl`; a rerun
keeps the images already there. It then writes report.json and report.md beside them and prints
the table with the paper's rows. The metric networks' weights are local files (`--dino_weights`,
`--clip_weights`, `--lpips_weights`, `--alexnet_weights`, by default under models/eval/); a missing
one is named with the address to download it from.
"""

import argparse
import gc
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import load_model_from_config, read_checkpoint
from ldm.config_files import config_from_data, read_config_file
from ldm.data.images import ImageFiles, check_image_folder
from ldm.eval import toy_runs
from ldm.eval.clip import DEFAULT_ARCH
from ldm.eval.dreambench import (
    Subject,
    class_prompt,
    custom_subject,
    dreambench_subject,
    prompts_for,
)
from ldm.eval.generate import (
    ImageSpec,
    SamplingSettings,
    generate_images,
    load_generated,
    missing,
    plan_images,
    weights_id,
)
from ldm.eval.metrics import Evaluator, strip_identifier
from ldm.eval.report import PAPER_TABLE1, json_safe, markdown_table, write_report
from ldm.eval.toy import load_toy_evaluator
from ldm.sample import prepare_for_sampling
from ldm.train.state import RunDir
from ldm.train.trackers import record_evaluation
from ldm.util import default_precision

WEIGHTS = Path("models/eval")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", help="a run folder (its last.ckpt) or a .ckpt/.safetensors file")
    p.add_argument("--config", help="model config (default: the one inside the checkpoint)")
    p.add_argument("--use_ema", action="store_true", help="sample with the model_ema.* weights")
    p.add_argument(
        "--unsafe_load",
        action="store_true",
        help="trust the files: arbitrary unpickling, any config target",
    )
    p.add_argument("--token", help="the identifier (default: the run's data.token, else sks)")
    p.add_argument("--subject", help="a DreamBench subject, e.g. dog (with --dreambench_root)")
    p.add_argument("--dreambench_root", help="the DreamBench folder of subject folders")
    p.add_argument("--real_dir", help="your own subject's photos (with --class_word)")
    p.add_argument("--class_word", help="your subject's class noun, e.g. dog")
    p.add_argument("--toy_subject", help="or a toy-world subject: ball, box or cup")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                   help="live-subject prompts (default: for dogs and cats, as DreamBench)")  # fmt: skip
    p.add_argument("--outdir", help="default: RUN/eval/<checkpoint>/<subject>")
    p.add_argument("--n_samples", type=int, default=4, help="images per prompt")
    p.add_argument("--num_prompts", type=int, default=25, help="use the first N prompts")
    p.add_argument("--n_class_images", type=int, default=32, help='"a [class]" images for PRES')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--size", type=int, help="image size (default: the run's data.size, else 512)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--precision", choices=["full", "autocast", "fp16", "bf16"],
                   help="default: autocast (fp16) on CUDA, full on CPU")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dino_weights", default=str(WEIGHTS / "dino_deitsmall16_pretrain.pth"),
                   help="the official DINO ViT-S/16 file")  # fmt: skip
    p.add_argument("--clip_weights", default=str(WEIGHTS / "open_clip_model.safetensors"),
                   help="CLIP weights in open_clip's layout (OpenAI ViT-B/32 by default)")  # fmt: skip
    p.add_argument("--clip_arch", default=DEFAULT_ARCH, help="open_clip model name")
    p.add_argument("--clip_quick_gelu", action=argparse.BooleanOptionalAction, default=True,
                   help="QuickGELU, as OpenAI's CLIP weights need")  # fmt: skip
    p.add_argument("--lpips_weights", default=str(WEIGHTS / "alex.pth"), help="LPIPS v0.1 heads")
    p.add_argument("--alexnet_weights", default=str(WEIGHTS / "alexnet-owt-7be5be79.pth"),
                   help="torchvision's AlexNet, LPIPS's backbone")  # fmt: skip
    return p


@dataclass(frozen=True)
class Target:
    """What to evaluate: a checkpoint and its config, a subject, and the prompt words."""

    ckpt: Path
    config: DictConfig
    subject: Subject
    token: str
    prompt_class: str  # the class noun the run was trained with (the ablations change it)
    outdir: Path


def checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    return RunDir(path).last if path.is_dir() else path


def default_outdir(ckpt: Path, subject_name: str) -> Path:
    """RUN/eval/<checkpoint stem>/<subject> for a checkpoint in a run folder."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / ckpt.stem / subject_name
    return Path("outputs") / "eval" / ckpt.stem / subject_name


def model_config(opt: argparse.Namespace, ckpt: Path) -> DictConfig:
    """--config, else the checkpoint's own (a .safetensors file's in its metadata): bounded,
    without interpolations; its targets are checked when the model is built."""
    if opt.config:
        return read_config_file(opt.config)
    _, extras = read_checkpoint(ckpt, unsafe_load=opt.unsafe_load)
    if "config" not in extras:
        raise ValueError(f"{ckpt}: carries no config (not a training checkpoint): pass --config")
    return config_from_data(extras["config"], f"{ckpt}: config")


def subject_of(opt: argparse.Namespace) -> Subject:
    if opt.subject and opt.real_dir:
        raise ValueError("pass --subject (DreamBench) or --real_dir, not both")
    if opt.subject:
        if not opt.dreambench_root:
            raise ValueError("--subject needs --dreambench_root, the folder of subject folders")
        return dreambench_subject(opt.subject, opt.dreambench_root)
    if opt.real_dir and opt.class_word:
        return custom_subject(opt.real_dir, opt.class_word, opt.live)
    raise ValueError("pass --subject with --dreambench_root, or --real_dir with --class_word")


def resolve(opt: argparse.Namespace) -> Target:
    if not opt.ckpt:
        raise ValueError("pass --ckpt, a run folder or a checkpoint")
    for flag in ("n_samples", "num_prompts", "ddim_steps", "batch_size"):
        if getattr(opt, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1")
    subject = subject_of(opt)
    ckpt = checkpoint_path(opt.ckpt)
    if not ckpt.is_file():
        raise ValueError(f"{ckpt}: no such checkpoint")
    subject.real_images()  # a missing or empty photo folder fails before any work
    config = model_config(opt, ckpt)
    token = opt.token or OmegaConf.select(config, "data.token", default=None) or "sks"
    trained_class = OmegaConf.select(config, "data.class_word", default=None)
    prompt_class = subject.class_word if trained_class is None else trained_class
    outdir = Path(opt.outdir) if opt.outdir else default_outdir(ckpt, subject.name)
    return Target(ckpt, config, subject, token, prompt_class, outdir)


def build_evaluator(opt: argparse.Namespace, device: str | None = None) -> Evaluator:
    """The DINO, CLIP and LPIPS networks from the weight files named by the flags."""
    return Evaluator.from_weights(
        opt.dino_weights,
        opt.clip_weights,
        opt.lpips_weights,
        opt.alexnet_weights,
        clip_arch=opt.clip_arch,
        clip_quick_gelu=opt.clip_quick_gelu,
        device=device or opt.device,
    )


def sampling_settings(opt: argparse.Namespace, target: Target) -> SamplingSettings:
    size = opt.size or OmegaConf.select(target.config, "data.size", default=None) or 512
    precision = opt.precision or default_precision(opt.device)
    return SamplingSettings(
        ddim_steps=opt.ddim_steps,
        scale=opt.scale,
        eta=opt.ddim_eta,
        negative_prompt=opt.negative_prompt,
        precision=precision,
        height=size,
        width=size,
        weights=weights_id(target.ckpt, opt.use_ema),
    )


def subject_prompts(target: Target, opt: argparse.Namespace) -> list[str]:
    """The first `--num_prompts` DreamBench prompts, with the class noun the run trained with."""
    prompts = prompts_for(target.prompt_class, target.token, target.subject.live)
    return prompts[: opt.num_prompts]


def plan(target: Target, opt: argparse.Namespace) -> tuple[list[ImageSpec], list[ImageSpec]]:
    """(subject images, class images for PRES)."""
    subject = plan_images("subject", subject_prompts(target, opt), opt.n_samples, opt.seed)
    prior = [class_prompt(target.subject.class_word)]
    return subject, plan_images("class", prior, opt.n_class_images, opt.seed)


def generate_missing(
    target: Target, opt: argparse.Namespace, settings: SamplingSettings, specs: list[ImageSpec]
) -> None:
    """Load the model only when there is something to generate, and free it afterwards."""
    if not missing(target.outdir, specs, settings):
        return
    model = load_model_from_config(target.config, target.ckpt, opt.use_ema, opt.unsafe_load)
    model = prepare_for_sampling(model, opt.device, settings.precision)
    generate_images(
        model, target.outdir, specs, settings, opt.batch_size, checkpoint=str(target.ckpt)
    )
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def notes(
    target: Target, opt: argparse.Namespace, settings: SamplingSettings, n_real: int
) -> list[str]:
    """The report's fine print: what was generated, and how CLIP-T and PRES were measured."""
    s, n_prompts = target.subject, len(subject_prompts(target, opt))
    example = strip_identifier(subject_prompts(target, opt)[0], target.token)
    lines = [
        f"Checkpoint `{target.ckpt}`; {n_prompts} prompts x {opt.n_samples} images (seed "
        f"{opt.seed}), DDIM {settings.ddim_steps} steps, eta {settings.eta}, guidance "
        f"{settings.scale}, {settings.width}x{settings.height}, precision {settings.precision}.",
        f"CLIP-T compares each image with its prompt without the identifier {target.token!r} "
        f"(e.g. {example!r}).",
        f"PRES: {opt.n_class_images} images of {class_prompt(s.class_word)!r} against the "
        f"{n_real} real photos (DINO; lower is better). DIV: mean LPIPS distance between images "
        "of the same prompt.",
        "The paper's rows average the 30 DreamBench subjects; this row is one subject.",
    ]
    if target.prompt_class != s.class_word:
        lines.append(
            f"The prompts use the class noun the run was trained with, {target.prompt_class!r}; "
            f"the subject is a {s.class_word}."
        )
    return lines


def report(
    target: Target, opt: argparse.Namespace, settings: SamplingSettings, metrics: dict, n_real: int
) -> tuple[dict, str]:
    """(report.json's content, report.md's)."""
    s = target.subject
    data = {
        "subject": s.name,
        "class_word": s.class_word,
        "live": s.live,
        "token": target.token,
        "prompt_class_word": target.prompt_class,
        "checkpoint": str(target.ckpt),
        "metrics": json_safe(metrics),
        "clip_t_prompts": "without the identifier",
        "images": {
            "prompts": len(subject_prompts(target, opt)),
            "per_prompt": opt.n_samples,
            "class_prompt": class_prompt(s.class_word),
            "class_images": opt.n_class_images,
            "real": n_real,
        },
        "seed": opt.seed,
        "sampling": asdict(settings),
        "paper": PAPER_TABLE1,
    }
    rows = [(f"this run: {s.name}", metrics), *PAPER_TABLE1.items()]
    fine_print = "\n".join(f"- {line}" for line in notes(target, opt, settings, n_real))
    title = f"# DreamBooth evaluation: {s.name} (class noun {s.class_word!r})"
    return data, "\n\n".join([title, markdown_table(rows), fine_print])


def evaluate(
    target: Target, opt: argparse.Namespace, evaluator: Evaluator
) -> tuple[dict[str, float], str]:
    """Generate what is missing, measure, and write report.json and report.md; returns the
    metrics and the report's markdown."""
    settings = sampling_settings(opt, target)
    subject_specs, class_specs = plan(target, opt)
    # Decoded a batch at a time when measured (never all at full size at once); each is read
    # once now, so a bad photo fails before the generation.
    real = ImageFiles(check_image_folder(target.subject.real_dir))
    generate_missing(target, opt, settings, subject_specs + class_specs)
    metrics = evaluator.evaluate_subject(
        load_generated(target.outdir, subject_specs),
        real,
        [image for image, _ in load_generated(target.outdir, class_specs)] or None,
        target.token,
    )
    data, markdown = report(target, opt, settings, metrics, len(real))
    write_report(target.outdir, data, markdown)
    return metrics, markdown


def record_in_run(target: Target, opt: argparse.Namespace, metrics: dict) -> None:
    """The figures of a run's last.ckpt also go into the run's summary, where sweeps and run
    comparisons read them (an evaluation of another checkpoint does not describe the run)."""
    run = RunDir(target.ckpt.parent.parent)
    if not opt.config and target.ckpt == run.last:
        record_evaluation(run.root, target.config, metrics)


def fail(e: Exception) -> int:
    print(f"evaluate.py: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


def evaluate_toy(argv: list[str]) -> int:
    """`--toy_subject S --ckpt RUN [sampling flags]`: the toy world's figures of the run."""
    p = argparse.ArgumentParser(prog="evaluate.py", add_help=False, allow_abbrev=False)
    p.add_argument("--toy_subject", required=True)
    p.add_argument("--ckpt", required=True)
    opt, flags = p.parse_known_args(argv)
    try:
        settings = toy_runs.settings_from_flags(flags)
        ckpt = toy_runs.run_checkpoint(opt.ckpt)
        figures = toy_runs.evaluate_run(ckpt, load_toy_evaluator(), opt.toy_subject, **settings)
        run = RunDir(ckpt.parent.parent)
        if ckpt == run.last:  # as record_in_run: only last.ckpt's figures describe the run
            record_evaluation(run.root, toy_runs.checkpoint_config(ckpt), figures)
    except (ValueError, OSError) as e:
        return fail(e)
    print(toy_runs.markdown(f"{ckpt}: {opt.toy_subject}", figures))
    return 0


def main(argv: list[str] | None = None, evaluator: Evaluator | None = None) -> int:
    """Exit code 0, or 1 with one line on stderr. `evaluator` replaces the networks built from
    the weight flags (tests pass tiny ones)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--toy_subject" or a.startswith("--toy_subject=") for a in argv):
        return evaluate_toy(argv)
    opt = parser().parse_args(argv)
    try:
        target = resolve(opt)
        # Before generating (which can take an hour): a missing weight file fails now.
        evaluator = evaluator or build_evaluator(opt)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: a weight file's keys
        return fail(e)
    try:
        metrics, markdown = evaluate(target, opt, evaluator)
        record_in_run(target, opt, metrics)
    except (ValueError, OSError, torch.cuda.OutOfMemoryError) as e:
        return fail(e)
    print(markdown)
    print(f"\nwritten to {target.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
