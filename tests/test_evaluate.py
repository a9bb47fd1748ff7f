"""DreamBench prompts, resumable evaluation images, and scripts/evaluate.py and scripts/ablate.py
end to end on tiny trained runs with tiny random metric networks (CPU, no downloads)."""

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from ldm.data.images import list_images, load_rgb
from ldm.eval import dreambench
from ldm.eval.generate import (
    INDEX,
    SamplingSettings,
    generate_images,
    plan_images,
    read_index,
)
from ldm.eval.report import format_value
from scripts import ablate, evaluate

from .conftest import ROOT
from .test_eval_metrics import evaluator, tiny_clip_arch  # noqa: F401 (fixtures)
from .train_helpers import TINY, small_overrides

DOG_PHOTOS = ROOT / "data" / "demo" / "dog"
# A run's evaluation at the smallest size: few prompts, images and steps.
TINY_EVAL = ["--num_prompts", "2", "--n_samples", "2", "--n_class_images", "2"]
TINY_EVAL += ["--ddim_steps", "2", "--device", "cpu"]


def test_dreambench_subjects_and_prompts():
    assert len(dreambench.SUBJECT_CLASSES) == 30
    root = Path("bench")
    for name, cls, live in [
        ("dog", "dog", True),
        ("cat2", "cat", True),
        ("backpack_dog", "backpack", False),  # a backpack with a dog on it: an object
        ("bear_plushie", "stuffed animal", False),
        ("pink_sunglasses", "glasses", False),
    ]:
        subject = dreambench.dreambench_subject(name, root)
        assert (subject.class_word, subject.live, subject.real_dir) == (cls, live, root / name)
    assert sum(s == "dog" or s == "cat" for s in dreambench.SUBJECT_CLASSES.values()) == 9
    with pytest.raises(ValueError, match="unknown DreamBench subject 'dog4'"):
        dreambench.dreambench_subject("dog4", root)

    live = dreambench.prompts_for("dog", "sks", live=True)
    objects = dreambench.prompts_for("backpack", "sks", live=False)
    assert len(live) == len(objects) == len(set(live)) == len(set(objects)) == 25
    assert live[0] == "a sks dog in the jungle" and live[-1] == "a cube shaped sks dog"
    assert "a sks dog wearing a black top hat and a monocle" in live
    assert "a sks backpack floating in an ocean of milk" in objects
    # The first 10 and last 5 prompts are shared, the middle 10 are the kind's own.
    swap = [p.replace("backpack", "dog") for p in objects]
    assert swap[:10] == live[:10] and swap[20:] == live[20:] and not set(swap[10:20]) & set(live)
    assert dreambench.prompts_for("", "sks", live=False)[20] == "a red sks"
    assert dreambench.class_prompt("stuffed animal") == "a stuffed animal"

    assert dreambench.custom_subject("photos/rex", "dog").live
    assert not dreambench.custom_subject("photos/pot", "teapot").live
    assert dreambench.custom_subject("photos/pot", "teapot", live=True).live
    with pytest.raises(ValueError, match="class noun"):
        dreambench.custom_subject("photos/x", " ")


def png(path: Path) -> np.ndarray:
    return np.asarray(load_rgb(path), dtype=np.int16)


def test_generation_writes_an_index_and_resumes(tmp_path, tiny_v1):
    settings = SamplingSettings(ddim_steps=2, height=32, width=32, precision="full")
    specs = plan_images("subject", ["a sks dog", "a sks dog in the snow"], 2, seed=7)
    # The seed of image j of prompt i depends on (seed, set, i, j) only, not on the prompts.
    assert [s.seed for s in plan_images("subject", ["x", "y"], 2, 7)] == [s.seed for s in specs]
    assert len({s.seed for s in specs + plan_images("subject", ["a"], 1, 8)}) == 5

    def run(batch_size: int = 3, **changes) -> int:
        chosen = SamplingSettings(**{**settings.__dict__, **changes})
        return generate_images(tiny_v1, tmp_path, specs, chosen, batch_size, "m.ckpt", False)

    assert run() == 4  # batches of 3 and 1, mixing prompts
    records = read_index(tmp_path)
    assert (
        sorted(records)
        == sorted(s.file for s in specs)
        == sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    )
    for spec in specs:
        assert records[spec.file]["prompt"] == spec.prompt
        assert records[spec.file]["seed"] == spec.seed
        assert records[spec.file]["settings"]["ddim_steps"] == 2
        assert records[spec.file]["checkpoint"] == "m.ckpt"
    first = {s.file: png(tmp_path / s.file) for s in specs}
    assert first[specs[0].file].shape == (32, 32, 3)
    assert np.abs(first[specs[0].file] - first[specs[1].file]).max() > 10  # seeds differ

    assert run() == 0  # everything is there
    with open(tmp_path / INDEX, "a") as f:
        f.write('{"file": "subject/000_')  # a write cut short
    (tmp_path / specs[2].file).unlink()
    assert run(batch_size=1) == 1
    # Same seed, same image (another batch may move a pixel by a rounding step).
    assert all(np.abs(png(tmp_path / s.file) - first[s.file]).max() <= 1 for s in specs)
    # Images made otherwise (other settings or weights) are made again, never mixed in.
    assert run(ddim_steps=4) == 4 and run(ddim_steps=4) == 0
    assert all(r["settings"]["ddim_steps"] == 4 for r in read_index(tmp_path).values())
    assert run(ddim_steps=4, weights="trained on") == 4


def train_tiny_run(logdir: Path, class_root: Path) -> Path:
    """The demo config at 32 px, one step; returns the run folder."""
    overrides = small_overrides(class_root, "train.max_steps=1", "prior.num_class_images=1")
    assert main.main(["-b", str(TINY), "-t", "-l", str(logdir), *overrides]) == 0
    (run,) = logdir.iterdir()
    return run


def test_evaluate_end_to_end(tmp_path, evaluator, capsys, monkeypatch):  # noqa: F811
    run = train_tiny_run(tmp_path / "logs", tmp_path / "class")
    argv = ["--ckpt", str(run), "--real_dir", str(DOG_PHOTOS), "--class_word", "dog", *TINY_EVAL]
    assert evaluate.main(argv, evaluator) == 0
    out = run / "eval" / "last" / "dog"
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"dino", "clip_i", "clip_t", "pres", "div"}
    assert all(-1 <= metrics[k] <= 1 for k in ("dino", "clip_i", "clip_t", "pres"))
    assert metrics["div"] > 0

    # The numbers are the metrics of the images in the index, with the run's token and class.
    records = read_index(out)
    subject = [r for r in records.values() if r["file"].startswith("subject/")]
    assert sorted(r["prompt"] for r in subject) == 2 * ["a sks dog in the jungle"] + 2 * [
        "a sks dog in the snow"
    ]
    assert [r["prompt"] for r in records.values() if r["file"].startswith("class/")] == 2 * [
        "a dog"
    ]
    expected = evaluator.evaluate_subject(
        [
            (load_rgb(out / r["file"]), r["prompt"])
            for r in sorted(subject, key=lambda r: r["file"])
        ],
        [load_rgb(p) for p in list_images(DOG_PHOTOS)],
        [load_rgb(out / f"class/000_{j:03d}.png") for j in range(2)],
        "sks",
    )
    assert metrics == pytest.approx(expected, abs=1e-5)

    markdown = (out / "report.md").read_text()
    this_run = "| this run: dog | " + " | ".join(format_value(v) for v in expected.values())
    for row in (
        this_run,
        "| DreamBooth (Stable Diffusion), paper | 0.668 | 0.803 | 0.305 | – | – |",
        "| Textual Inversion (Stable Diffusion), paper | 0.569 | 0.780 | 0.255 | – | – |",
        "| Real images, paper | 0.774 | 0.885 | – | – | – |",
    ):
        assert row in markdown
    assert "without the identifier 'sks' (e.g. 'a dog in the jungle')" in markdown
    assert this_run in capsys.readouterr().out

    # A rerun reuses every image: it never loads the model.
    monkeypatch.setattr(evaluate, "load_model_from_config", None)
    assert evaluate.main(argv, evaluator) == 0
    assert json.loads((out / "report.json").read_text())["metrics"] == metrics


def test_evaluate_names_a_missing_weight_file(tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"")
    argv = ["--ckpt", str(ckpt), "--config", str(TINY), "--real_dir", str(DOG_PHOTOS)]
    argv += ["--class_word", "dog", "--dino_weights", str(tmp_path / "dino.pth")]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dino.pth" in err and "dino_deitsmall16_pretrain.pth" in err
    assert evaluate.main(argv[:-2] + ["--subject", "dog"]) == 1
    assert "not both" in capsys.readouterr().err


def fake_dreambench(root: Path) -> Path:
    (root / "dog").mkdir(parents=True)
    for photo in list_images(DOG_PHOTOS)[:3]:
        shutil.copy(photo, root / "dog" / photo.name)
    return root


def test_ablate_end_to_end(tmp_path, evaluator, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "ablations"
    argv = ["-b", str(TINY), "--dreambench_root", str(fake_dreambench(tmp_path / "bench"))]
    argv += ["--subjects", "dog", "--variants", "prior,no_prior", "--out", str(out)]
    argv += ["--num_prompts", "1", "--n_samples", "1", "--n_class_images", "1"]
    argv += ["--ddim_steps", "2", "--device", "cpu"]
    overrides = small_overrides(tmp_path, "train.max_steps=1", "prior.num_class_images=1")
    argv += [o for o in overrides if not o.startswith("data.class_root=")]  # ablate sets it
    assert ablate.main(argv, evaluator) == 0
    printed = capsys.readouterr().out

    result = json.loads((out / "ablation.json").read_text())
    assert set(result["runs"]) == {"prior", "no_prior"} and result["failed"] == []
    prior, no_prior = result["runs"]["prior"]["dog"], result["runs"]["no_prior"]["dog"]
    assert prior != no_prior
    table3 = printed[printed.index("## Table 3") :]
    for label, m in [("with", prior), ("without", no_prior)]:
        row = f"| {label} prior preservation, ours | " + " | ".join(
            format_value(m[k]) for k in ("dino", "clip_i", "clip_t", "pres", "div")
        )
        assert row in table3
    assert (
        "| with prior preservation, paper (Imagen) | 0.684 | 0.815 | 0.308 | 0.493 | 0.391 |"
        in table3
    )
    assert "Table 4" not in printed  # no class-noun variant ran
    assert (out / "ablation.md").read_text().strip() in printed

    # Each variant trained with its config; the class images are shared per class noun.
    for variant, weight in [("prior", 1.0), ("no_prior", 0.0)]:
        (run,) = (out / "runs" / "dog" / variant).iterdir()
        config = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["config"]
        assert config["train"]["prior_loss_weight"] == weight
        assert config["data"]["instance_root"] == str((tmp_path / "bench" / "dog").resolve())
    assert len(list_images(out / "class_images" / "dog")) == 1

    # A rerun trains nothing and generates nothing.
    with monkeypatch.context() as patch:
        patch.setattr(ablate.train_main, "main", None)
        patch.setattr(evaluate, "load_model_from_config", None)
        assert ablate.main(argv, evaluator) == 0
    assert json.loads((out / "ablation.json").read_text())["runs"] == result["runs"]

    # More steps: the run resumes in its folder, and its images are made again from it.
    (run,) = (out / "runs" / "dog" / "no_prior").iterdir()
    argv[argv.index("prior,no_prior")] = "no_prior"
    assert ablate.main([*argv, "train.max_steps=2"], evaluator) == 0
    assert [run] == list((out / "runs" / "dog" / "no_prior").iterdir())
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert json.loads((out / "ablation.json").read_text())["runs"]["no_prior"]["dog"] != no_prior


def test_ablation_plans_per_subject_class_nouns(tmp_path):
    argv = ["-b", str(TINY), "--dreambench_root", str(tmp_path), "--subjects", "x"]
    opt, _ = ablate.parser().parse_known_args([*argv, "--out", str(tmp_path / "out")])
    jobs = {
        (s, v): ablate.plan_job(s, v, opt, ["train.max_steps=5"])
        for s in ("dog", "can", "bear_plushie")
        for v in ("wrong_class", "no_class", "no_prior", "prior", "text_encoder")
    }
    classes = {
        k: [o for o in j.overrides if o.startswith("data.class_word=")] for k, j in jobs.items()
    }
    assert classes[("dog", "wrong_class")] == ["data.class_word=can"]
    assert classes[("can", "wrong_class")] == ["data.class_word=backpack"]
    assert classes[("dog", "no_class")] == []  # the variant's config sets it
    roots = {k: j.class_root and Path(j.class_root).name for k, j in jobs.items()}
    assert roots[("dog", "prior")] == "dog" and roots[("dog", "no_prior")] is None
    assert roots[("bear_plushie", "prior")] == "stuffed_animal"
    assert roots[("dog", "no_class")] == "no_class_noun"
    assert roots[("dog", "wrong_class")] == roots[("can", "prior")] == "can"
    assert all(j.max_steps == 5 for j in jobs.values())
    assert jobs[("dog", "text_encoder")].bases[-1].endswith("configs/ablations/text_encoder.yaml")
    opt.wrong_class = "dog"
    with pytest.raises(ValueError, match="--wrong_class dog is the class of subject dog"):
        ablate.plan_job("dog", "wrong_class", opt, [])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_gpu_queue_runs_every_job_once_and_never_two_on_one_class_folder(tmp_path):
    dog = dreambench.dreambench_subject("dog", tmp_path)
    jobs = [
        ablate.Job(dog, f"v{i}", (), (), tmp_path, 1, root)
        for i, root in enumerate(["a", "a", "a", "b", None, None])
    ]
    spans, lock = [], threading.Lock()

    def launch(job, gpu) -> bool:
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            spans.append((job, gpu, start, time.monotonic()))
        if job.variant == "v5":
            raise RuntimeError("a crashed worker still frees its class folder")
        return job.variant != "v3"

    failed = ablate.run_queue(jobs, [0, 1, 2], launch)
    assert sorted(j.variant for j, *_ in spans) == [j.variant for j in jobs]
    assert {j.variant for j in failed} == {"v3", "v5"}
    assert {gpu for _, gpu, *_ in spans} == {0, 1, 2}
    for a, _, start_a, end_a in spans:
        for b, _, start_b, end_b in spans:
            if a is not b and a.class_root is not None and a.class_root == b.class_root:
                assert end_a <= start_b or end_b <= start_a
