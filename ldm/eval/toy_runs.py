"""A DreamBooth run of a toy-world subject, measured by the toy world's evaluator
(`ldm.eval.toy`): what `scripts/evaluate.py --toy_subject` prints and what the toy target of
scripts/ablate.py and scripts/sweep.py records in a run's summary."""

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig

from ldm.checkpoint import load_model, read_checkpoint
from ldm.config_files import config_from_data
from ldm.data import toyworld as tw
from ldm.eval.report import markdown_table
from ldm.eval.toy import ToyEvaluator, evaluate_dreambooth

# The figures of `evaluate_dreambooth`, in table order, with their column titles.
METRIC_HEADERS = {
    "subject_rate": "subject rate ↑",
    "subject_sim": "subject sim ↑",
    "colour_rate": "subject colour ↑",
    "class_acc": "class ↑",
    "prompt_fidelity": "prompt fidelity ↑",
    "pres": "PRES ↓",
    "pres_sim": "PRES sim ↓",
    "pres_colour": "PRES colour ↓",
    "div": "DIV ↑",
    "class_div": "class DIV ↑",
}
# The sampling settings of `evaluate_dreambooth` a target or the command line may set.
SETTINGS = ("n_per_prompt", "n_class", "ddim_steps", "scale", "seed")
NOTES = (
    "Subject rate and PRES: samples of the subject / class prompt the evaluator's subject head "
    "calls the subject. Subject sim: "
    "cosine of its embeddings to 16 renders of the subject (DINO's analogue); PRES sim: the same "
    "for the class prompt's samples. Subject colour / PRES colour: samples of the subject / class "
    "prompt whose colour head reads the subject's body colour (red ball, blue box, white cup). "
    "Class: samples showing the subject's class. Prompt fidelity: samples showing the prompted "
    "context (CLIP-T's analogue). DIV / class DIV: feature distance of same-prompt samples (the "
    "subject prompts / the class prompt)."
)


def settings_from_flags(flags: Sequence[str]) -> dict[str, int | float]:
    """scripts/evaluate.py's sampling flags given for the toy world (--n_samples,
    --n_class_images, --ddim_steps, --seed, --scale) as `evaluate_dreambooth`'s keyword
    arguments, only those given (the rest keep the toy world's defaults). Bad flag: ValueError."""
    p = argparse.ArgumentParser(prog="toy world", add_help=False, exit_on_error=False)
    p.add_argument("--n_samples", dest="n_per_prompt", type=int)
    p.add_argument("--n_class_images", dest="n_class", type=int)
    p.add_argument("--ddim_steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--scale", type=float)
    try:
        opt, unknown = p.parse_known_args(list(flags))
    except argparse.ArgumentError as e:
        raise ValueError(f"toy world: {e}") from None
    if unknown:
        raise ValueError(
            f"toy world: unrecognised arguments {' '.join(unknown)} (it takes --n_samples, "
            "--n_class_images, --ddim_steps, --seed, --scale)"
        )
    settings = {k: v for k, v in vars(opt).items() if v is not None}
    small = [k for k in ("n_per_prompt", "n_class", "ddim_steps") if settings.get(k, 1) < 1]
    if small:
        raise ValueError(f"toy world: {', '.join(small)} must be at least 1")
    return settings


def run_checkpoint(path: str | Path) -> Path:
    """A run folder's last.ckpt, or the checkpoint itself."""
    path = Path(path)
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise ValueError(f"{ckpt}: no such checkpoint")
    return ckpt


def checkpoint_config(ckpt: Path) -> DictConfig:
    """The config a checkpoint carries (a run's, or the toy base's metadata)."""
    _, extras = read_checkpoint(ckpt)
    if "config" not in extras:
        raise ValueError(f"{ckpt}: carries no config (not a training checkpoint)")
    return config_from_data(extras["config"], f"{ckpt}: config")


def evaluate_run(
    path: str | Path, evaluator: ToyEvaluator, subject: str, **settings
) -> dict[str, float]:
    """`evaluate_dreambooth` of a run folder's last.ckpt (or a checkpoint carrying its config,
    such as the toy base), prompted with the identifier and class noun the run trained with
    (`data.token`, `data.class_word`; default sks and the subject's class). PRES is measured on
    the subject's true class prompt. Bad input: ValueError."""
    if subject not in tw.SUBJECTS:
        raise ValueError(f"unknown toy subject {subject!r}: one of {', '.join(tw.SUBJECTS)}")
    ckpt = run_checkpoint(path)
    config = checkpoint_config(ckpt)
    model, _, _ = load_model(config.model, ckpt)
    data = config.get("data") or {}
    token, noun = data.get("token") or "sks", data.get("class_word")
    return evaluate_dreambooth(model.float().eval(), evaluator, subject, token, noun, **settings)


def markdown(label: str, figures: Mapping[str, float]) -> str:
    """One run's figures as a table, with the fine print."""
    return markdown_table([(label, figures)], list(METRIC_HEADERS), METRIC_HEADERS) + "\n\n" + NOTES
