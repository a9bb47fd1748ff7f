"""DreamBooth teaches the shipped toy base a subject: the test that fails when the method is broken
(the loss target, the timestep sampling, the identifier's binding or the prior term), not only
when the loss stops going down."""

import pytest

from ldm.data import toyworld as tw
from ldm.eval import toy
from ldm.train.config import load_config

from .train_helpers import run

DEMO = toy.ROOT / "configs" / "dreambooth" / "demo.yaml"
NOVEL = ["snow", "beach", "night"]  # the photos show the subject on grass and on a red table
STEPS = 200
N_PER_PROMPT = 8
# The evaluator's subject head is strict and rarely calls a sample the subject yet (see README,
# "The toy world"), so the test reads what the run binds to the identifier first: the subject's
# blue body. The base paints "a sks box" yellow or white (0 of 24 blue).
MIN_BLUE = 0.25
MAX_CLASS_BLUE = 0.2


@pytest.fixture(scope="module")
def evaluator() -> toy.ToyEvaluator:
    return toy.load_toy_evaluator()


def subject_figures(model, evaluator) -> dict[str, float]:
    """How often "a photo of a sks box in <novel context>" and "a photo of a box" are read as
    the subject, and as blue (the subject's body colour)."""
    prompts = toy.subject_prompts("sks", "box", "box", NOVEL)
    samples, prompts = toy.sample(model, prompts, N_PER_PROMPT, seed=1, ddim_steps=25)
    class_samples, _ = toy.sample(model, [toy.class_prompt("box")], 16, seed=1, ddim_steps=25)
    read, class_read = evaluator.read(samples), evaluator.read(class_samples)
    return {
        "subject_rate": toy.fraction([s == "box" for s in read.labels["subject"]]),
        "blue": toy.fraction([c == "blue" for c in read.labels["colour"]]),
        "pres": toy.fraction([s == "box" for s in class_read.labels["subject"]]),
        "class_blue": toy.fraction([c == "blue" for c in class_read.labels["colour"]]),
    }


def test_the_base_has_never_seen_the_subject(evaluator):
    figures = subject_figures(toy.load_toy_base(), evaluator)
    assert figures["subject_rate"] <= 0.1 and figures["pres"] <= 0.1, figures
    assert figures["blue"] <= 0.1, figures


def test_dreambooth_learns_the_subject_in_new_contexts(tmp_path, evaluator):
    assert tw.SUBJECTS["box"].cls == "box"
    cfg = load_config(
        [DEMO],
        [
            f"data.class_root={tmp_path / 'class'}",
            "prior.num_class_images=32",
            "prior.ddim_steps=25",
            f"train.max_steps={STEPS}",
            "train.lr=1e-3",
            "train.val_every=0",
            "train.save_every=0",
            "train.sample.every=0",
            f"train.actual_resume={toy.BASE_WEIGHTS}",
        ],
    )
    _, folder = run(cfg, tmp_path / "run")
    figures = subject_figures(toy.load_toy_base(folder.last), evaluator)
    assert figures["blue"] >= MIN_BLUE, figures
    assert figures["class_blue"] <= MAX_CLASS_BLUE, figures  # "a box" is still any box
