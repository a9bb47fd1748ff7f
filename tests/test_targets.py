"""Evaluation targets plug into the ablation runner (scripts/targets.py): a target of another
kind gives its subjects' training data and measures the finished runs; the figures reach the
runs' summaries and the ablation tables, and the target survives a GPU worker's JSON."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.images import list_images
from ldm.train.trackers import read_summary
from scripts import ablate, runner, targets

from .conftest import ROOT
from .train_helpers import TINY, small_overrides

DOG_PHOTOS = ROOT / "data" / "demo" / "dog"


@dataclass(frozen=True)
class CopiedPhotos(targets.Target):
    """Subjects whose photos the target writes itself (as a procedural world would), measured
    by what their runs were trained with; `broken` subjects cannot be measured."""

    names: tuple[str, ...] = ("rex",)
    n_photos: int = 3
    broken: tuple[str, ...] = ()

    kind = "copied_photos"
    metrics = ("steps", "photos", "flip_p")
    subject_metrics = ("photos",)
    headers = {"steps": "Steps"}
    paper = {"prior": {"a published row": {"steps": 9.0}}}

    def subjects(self, out: Path) -> list[targets.TargetSubject]:
        found = []
        for name in self.names:
            folder = out / "photos" / name
            if not folder.is_dir():
                folder.mkdir(parents=True)
                for photo in list_images(DOG_PHOTOS)[: self.n_photos]:
                    shutil.copy(photo, folder / photo.name)
            found.append(targets.TargetSubject(name, "dog", str(folder), (("flip_p", 0.0),)))
        return found

    def load(self, device: str | None) -> dict:
        return {"device": device}

    def evaluate(self, networks, run: Path, subject, device) -> dict[str, float]:
        if subject.name in self.broken:
            raise ValueError(f"{subject.name}: cannot be measured")
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        data = ckpt["config"]["data"]
        assert networks == {"device": "cpu"} and device == "cpu"
        photos = len(list_images(data["instance_root"]))
        return {"steps": ckpt["global_step"], "photos": photos, "flip_p": data["flip_p"]}


def test_a_target_of_another_kind_runs_through_the_ablation(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablations"
    argv = ["-b", str(TINY), "--variants", "prior,no_prior", "--out", str(out), "--device", "cpu"]
    overrides = small_overrides(tmp_path, "train.max_steps=1", "prior.num_class_images=1")
    argv += [o for o in overrides if not o.startswith("data.class_root=")]  # ablate sets it
    target = CopiedPhotos()
    assert ablate.main(argv, target=target) == 0
    printed = capsys.readouterr().out

    result = json.loads((out / "ablation.json").read_text())
    assert result["target"] == "copied_photos" and result["subjects"] == ["rex"]
    figures = {"steps": 1, "photos": 3, "flip_p": 0.0}
    assert result["runs"] == {"prior": {"rex": figures}, "no_prior": {"rex": figures}}
    (run,) = (out / "runs" / "rex" / "prior").iterdir()
    config = OmegaConf.create(
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["config"]
    )
    assert config.data.instance_root == str((out / "photos" / "rex").resolve())
    assert config.data.flip_p == 0.0  # the subject's own data setting
    assert {k: v for k, v in read_summary(run).items() if k.startswith("eval/")} == {
        f"eval/{k}": v for k, v in figures.items()
    }
    # The tables: the target's columns, its subject-fidelity ones, and its published rows.
    table3 = printed[printed.index("## Table 3") :]
    assert "| | Steps | photos | flip_p |" in table3
    assert "| without prior preservation, ours | 1.000 | 3.000 | 0.000 |" in table3
    assert "| a published row | 9.000 | – | – |" in table3

    # A target that fails on one subject: reported, and the other subject's runs go on.
    broken = CopiedPhotos(names=("rex", "fido"), broken=("rex",))
    argv[argv.index("prior,no_prior")] = "no_prior"
    assert ablate.main(argv, target=broken) == 1
    err = capsys.readouterr().err
    assert "rex/no_prior: evaluation failed: rex: cannot be measured" in err
    result = json.loads((out / "ablation.json").read_text())
    assert result["failed"] == ["rex/no_prior"] and result["subjects"] == ["rex", "fido"]
    assert result["runs"]["no_prior"]["fido"]["steps"] == 1

    # A GPU worker rebuilds the target from the job's JSON, by its kind.
    monkeypatch.setitem(targets.TARGETS, CopiedPhotos.kind, CopiedPhotos)
    (subject,) = target.subjects(out)
    job = runner.make_job("rex/prior", [], [TINY], [], out, target, subject)
    assert runner.job_from_json(runner.job_to_json(job)) == job


def test_evaluate_py_targets_check_their_flags(tmp_path):
    with pytest.raises(ValueError, match="sets --outdir for each run itself"):
        targets.PhotosTarget(("--outdir", "x"), real_dir=str(DOG_PHOTOS), class_word="dog")
    with pytest.raises(ValueError, match="unrecognised arguments: --bogus 2"):
        targets.PhotosTarget(("--bogus", "2"), real_dir=str(DOG_PHOTOS), class_word="dog")
    with pytest.raises(ValueError, match="--n_samples: invalid int value: 'two'"):
        targets.PhotosTarget(("--n_samples", "two"), real_dir=str(DOG_PHOTOS), class_word="dog")
    target = targets.DreamBenchTarget(root=str(tmp_path), names=("dog", "backpack"))
    dog, backpack = target.subjects(tmp_path)
    assert (dog.class_word, backpack.class_word) == ("dog", "backpack")
    assert target.wrong_class(dog) == "can" and target.wrong_class(backpack) == "can"
    can = targets.TargetSubject("can", "can", str(tmp_path))
    assert target.wrong_class(can) == "backpack"
