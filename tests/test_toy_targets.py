"""The toy world as an evaluation target (scripts/targets.py's ToyTarget): scripts/ablate.py plans
the paper's variants on its subjects, trains them on the shipped base and records the toy
evaluator's figures; scripts/evaluate.py --toy_subject prints the same figures for a run."""

import json
import math
from pathlib import Path

import pytest

from ldm.data import toyworld as tw
from ldm.eval import toy, toy_runs
from ldm.train.config import load_config
from ldm.train.trackers import read_summary
from scripts import ablate, evaluate, runner, targets

DEMO = toy.ROOT / "configs" / "dreambooth" / "demo.yaml"
FIGURES = set(toy_runs.METRIC_HEADERS)
# A run of 2 steps, measured on 2 samples per context and 2 class samples at 2 DDIM steps: the
# mechanics, not the effect (README "The toy world" has the measured ablation).
FAST = ["train.max_steps=2", "train.val_every=0", "train.save_every=0", "train.sample.every=0",
        "prior.num_class_images=2", "prior.ddim_steps=2"]  # fmt: skip
FAST_EVAL = {"n_per_prompt": 2, "n_class": 2, "ddim_steps": 2}


def plan(tmp_path: Path, *argv: str) -> dict[str, runner.Job]:
    opt, rest = ablate.parser().parse_known_args(["-b", str(DEMO), "--out", str(tmp_path), *argv])
    overrides, flags = runner.split_args(rest)
    target = targets.target_of(opt, flags)
    return {job.name: job for job in ablate.plan(opt, target, overrides)}


def test_the_toy_plan_builds_each_variants_config(tmp_path):
    jobs = plan(tmp_path, "--toy_subjects", "box,cup", "train.max_steps=7")
    assert len(jobs) == 10 and all(job.error is None for job in jobs.values())
    cfg = {name: load_config(job.bases, job.overrides) for name, job in jobs.items()}
    box = cfg["box/prior"]
    assert box.data.instance_root == str((toy.ROOT / "data" / "toy" / "box").resolve())
    assert (box.data.class_word, box.train.prior_loss_weight) == ("box", 1.0)
    assert box.train.max_steps == 7 and box.train.lr == 5e-4  # demo's settings, overrides last
    assert cfg["box/no_prior"].train.prior_loss_weight == 0
    assert jobs["box/no_prior"].class_root is None  # no class images for it
    assert cfg["box/no_class"].data.class_word == ""
    assert jobs["box/no_class"].class_root == str(tmp_path / "class_images" / "no_class_noun")
    # The wrong noun is another class of the world, and its class images are of that class.
    assert cfg["box/wrong_class"].data.class_word == "cup"
    assert cfg["cup/wrong_class"].data.class_word == "ball"
    assert jobs["box/wrong_class"].class_root == str(tmp_path / "class_images" / "cup")
    assert list(cfg["cup/text_encoder"].train.trainable) == ["unet", "text_encoder"]
    assert cfg["cup/prior"].data.instance_root.endswith("data/toy/cup")


def test_toy_target_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="toy subjects: dog: choose from ball, box, cup"):
        plan(tmp_path, "--toy_subjects", "box,dog")
    with pytest.raises(ValueError, match="unrecognised arguments --dino_weights x"):
        plan(tmp_path, "--toy_subjects", "box", "--dino_weights", "x")
    with pytest.raises(ValueError, match="n_per_prompt must be at least 1"):
        plan(tmp_path, "--toy_subjects", "box", "--n_samples", "0")
    with pytest.raises(ValueError, match="one of them"):
        plan(tmp_path, "--toy_subjects", "box", "--real_dir", "x", "--class_word", "dog")
    jobs = plan(tmp_path, "--toy_subjects", "ball", "--variants", "prior", "--ddim_steps", "9")
    job = jobs["ball/prior"]
    assert job.target == targets.ToyTarget(("ball",), ddim_steps=9)  # only the flags given change
    assert runner.job_from_json(runner.job_to_json(job)) == job  # as a GPU worker rebuilds it


def test_toy_runs_are_measured_with_the_noun_they_trained_with(tmp_path, capsys, monkeypatch):
    prompted = []
    measure = toy_runs.evaluate_dreambooth

    def spy(model, evaluator, subject, token, noun, **settings):
        prompted.append((subject, token, noun))
        return measure(model, evaluator, subject, token, noun, **settings)

    monkeypatch.setattr(toy_runs, "evaluate_dreambooth", spy)
    out = tmp_path / "ablation"
    argv = ["-b", str(DEMO), "--variants", "wrong_class", "--out", str(out), *FAST]
    target = targets.ToyTarget(("box",), **FAST_EVAL)
    assert ablate.main(argv, target=target) == 0
    printed = capsys.readouterr().out
    assert prompted == [("box", "sks", "cup")]  # the run's noun; PRES: "a photo of a box"

    result = json.loads((out / "ablation.json").read_text())
    assert result["target"] == "toy" and set(result["runs"]) == {"wrong_class"}
    figures = result["runs"]["wrong_class"]["box"]
    assert set(figures) == FIGURES and all(v is not None for v in figures.values())
    assert 0 <= figures["colour_rate"] <= 1 and figures["class_div"] > 0
    table4 = printed[printed.index("## Table 4") :]
    assert "| | subject rate ↑ | subject sim ↑ | subject colour ↑ | class ↑ |\n" in table4
    assert "| wrong class noun, ours |" in table4

    # The command line prints the same figures for the run, and records what it measured in the
    # run's summary (here: another seed's figures).
    (run,) = (out / "runs" / "box" / "wrong_class").iterdir()
    assert printed_figures(capsys, run) == pytest.approx(figures, abs=5e-4)
    assert read_summary(run)["eval/class_div"] == pytest.approx(figures["class_div"])
    reseeded = printed_figures(capsys, run, "--seed", "1")
    assert reseeded["class_div"] != pytest.approx(figures["class_div"], abs=5e-4)
    assert read_summary(run)["eval/class_div"] == pytest.approx(reseeded["class_div"], abs=5e-4)


def printed_figures(capsys, run: Path, *flags: str) -> dict[str, float]:
    """The figures scripts/evaluate.py --toy_subject box prints for `run` (FAST_EVAL's sampling)."""
    fast = ["--n_samples", "2", "--n_class_images", "2", "--ddim_steps", "2", *flags]
    assert evaluate.main(["--toy_subject", "box", "--ckpt", str(run), *fast]) == 0
    printed = capsys.readouterr().out
    assert "| subject rate ↑ | subject sim ↑ | subject colour ↑ |" in printed
    row = next(line for line in printed.splitlines() if line.startswith(f"| {run}"))
    cells = [float(c) for c in row.strip("| \n").split(" | ")[1:]]
    assert not any(map(math.isnan, cells))
    return dict(zip(toy_runs.METRIC_HEADERS, cells))


def test_evaluate_py_toy_errors_are_one_line(tmp_path, capsys):
    assert evaluate.main(["--toy_subject", "dog", "--ckpt", str(toy.BASE_WEIGHTS)]) == 1
    assert capsys.readouterr().err == (
        "evaluate.py: error: unknown toy subject 'dog': one of ball, box, cup\n"
    )
    assert evaluate.main(["--toy_subject", "box", "--ckpt", str(tmp_path)]) == 1
    assert "last.ckpt: no such checkpoint" in capsys.readouterr().err


def test_colour_figures_read_the_subjects_body_colour():
    """On ground-truth renders (which the evaluator reads): blue boxes in each context are the
    box's colour, red boxes as the class prompt's samples are not."""
    assert [toy.subject_colour(s) for s in ("ball", "box", "cup")] == ["red", "blue", "white"]
    scenes = [
        tw.scene(3, i, cls="box", colour="blue", context=c) for i, c in enumerate(tw.CONTEXTS)
    ]
    prompts = toy.subject_prompts("sks", "box", "box")
    red = [tw.render(tw.scene(4, i, cls="box", colour="red")) for i in range(4)]
    real = [tw.render(s) for s in tw.subject_scenes("box", 4, seed=5)]
    evaluator = toy.load_toy_evaluator()
    figures = toy.subject_metrics(
        evaluator, [tw.render(s) for s in scenes], prompts, real, red, "box"
    )
    assert figures["colour_rate"] >= 0.8 and figures["pres_colour"] <= 0.2, figures
    assert figures["prompt_fidelity"] >= 0.8 and figures["class_acc"] >= 0.8, figures
