"""The run folder: lean step and best checkpoints, keep_last, resume from a lean checkpoint,
metrics.csv on resume, leftovers of killed and failed runs, one folder per run, saving in the
background."""

import os
import threading
import time

import torch

import main
from ldm.checkpoint import load_model_from_config
from ldm.train import saving
from ldm.train import state as run_state
from ldm.train.state import claim_run_dir

from .train_helpers import TINY, metrics, scripted_validation, small_overrides


def only_run(logdir):
    (folder,) = [p for p in logdir.iterdir() if p.is_dir()]
    return folder


def train_cli(logdir, class_root, *extra: str) -> int:
    return main.main(
        ["-b", str(TINY), "-t", "-l", str(logdir), *small_overrides(class_root, *extra)]
    )


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_only_last_holds_optimizer_state_and_best_is_written_at_save_points(
    tmp_path, class_root, monkeypatch
):
    # Best at 1 (kept in memory), 2 (a save point: linked), 3 (in memory, written at 4).
    scripted_validation(monkeypatch, {1: 5.0, 2: 4.0, 3: 3.0, 4: 6.0})
    extra = ("train.max_steps=4", "train.save_every=2", "train.val_every=1", "train.keep_last=1")
    assert train_cli(tmp_path, class_root, *extra) == 0
    folder = only_run(tmp_path)
    ckpts = folder / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt", "step=000004.ckpt"]
    last, step4, best = (load(ckpts / n) for n in ("last.ckpt", "step=000004.ckpt", "best.ckpt"))
    assert "optimizer" in last and last["optimizer"]["state"]
    for lean in (step4, best):
        assert "optimizer" not in lean and "rng" not in lean
        assert set(lean["state_dict"]) == set(last["state_dict"])
        assert lean["state_dict"]["model.diffusion_model.out.2.weight"].dtype == torch.float16
        assert lean["state_dict"]["alphas_cumprod"].dtype == torch.float32  # schedule stays fp32
    assert best["global_step"] == 3 and step4["global_step"] == 4
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(step4["state_dict"][key], last["state_dict"][key].half())
    assert not torch.equal(best["state_dict"][key], step4["state_dict"][key])
    assert (ckpts / "step=000004.ckpt").stat().st_size < 0.6 * (ckpts / "last.ckpt").stat().st_size
    model = load_model_from_config(main.load_config([TINY]), ckpts / "best.ckpt")  # txt2img's load
    assert model.state_dict()[key].dtype == torch.float32


def test_a_best_at_a_save_point_is_a_link_to_its_step_checkpoint(tmp_path, class_root, monkeypatch):
    scripted_validation(monkeypatch, {1: 5.0, 2: 4.0})
    extra = ("train.max_steps=2", "train.save_every=2", "train.val_every=1", "train.keep_last=2")
    assert train_cli(tmp_path, class_root, *extra) == 0
    ckpts = only_run(tmp_path) / "checkpoints"
    assert os.path.samefile(ckpts / "best.ckpt", ckpts / "step=000002.ckpt")


def test_full_state_steps_and_fp32_lean_files(tmp_path, class_root):
    extra = ("train.max_steps=2", "train.save_every=1", "train.keep_last=2")
    assert train_cli(tmp_path / "a", class_root, *extra, "train.full_state_steps=true") == 0
    step = load(only_run(tmp_path / "a") / "checkpoints" / "step=000001.ckpt")
    assert step["optimizer"]["state"] and step["global_step"] == 1
    assert train_cli(tmp_path / "b", class_root, *extra, "train.lean_fp16=false") == 0
    step = load(only_run(tmp_path / "b") / "checkpoints" / "step=000001.ckpt")
    assert "optimizer" not in step
    assert step["state_dict"]["model.diffusion_model.out.2.weight"].dtype == torch.float32


def test_resume_from_a_lean_checkpoint_and_metrics_keep_one_row_per_step(
    tmp_path, class_root, capsys
):
    extra = ("train.max_steps=4", "train.save_every=2", "train.keep_last=2")
    assert train_cli(tmp_path, class_root, *extra) == 0
    folder = only_run(tmp_path)
    first = metrics(folder)
    capsys.readouterr()
    step2 = folder / "checkpoints" / "step=000002.ckpt"
    assert main.main(["-r", str(step2), "-t", "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "a lean checkpoint (weights only, no optimizer state)" in out
    assert "at step 2 with a fresh optimizer" in out
    rows = metrics(folder)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"]  # 3 and 4 not twice
    assert rows[:2] == first[:2]
    assert load(folder / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_a_resume_removes_unfinished_checkpoint_files_and_adds_one_config(
    tmp_path, class_root, capsys
):
    assert train_cli(tmp_path, class_root, "train.max_steps=1") == 0
    folder = only_run(tmp_path)
    configs = set((folder / "configs").iterdir())
    # A failed resume (the override does not fit the checkpoint) adds no config file.
    bad = "model.params.unet_config.params.model_channels=64"
    assert main.main(["-r", str(folder), "-t", "train.max_steps=2", bad]) == 1
    assert set((folder / "configs").iterdir()) == configs
    orphan = folder / "checkpoints" / ".last.ckpt.k2j4h1.tmp"  # as a killed save leaves it
    orphan.write_bytes(b"half of a checkpoint")
    capsys.readouterr()
    assert main.main(["-r", str(folder), "-t", "train.max_steps=2"]) == 0
    assert "removed 1 unfinished checkpoint files" in capsys.readouterr().out
    assert not orphan.exists()
    assert len(set((folder / "configs").iterdir()) - configs) == 1


def test_two_runs_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(run_state.time, "strftime", lambda fmt: "2026-01-01T00-00-00")
    first, second = claim_run_dir(tmp_path, "dog"), claim_run_dir(tmp_path, "dog")
    assert first.root != second.root and first.root.is_dir() and second.root.is_dir()
    assert second.root.name == "2026-01-01T00-00-00_dog-2"


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_no_folder(
    tmp_path, class_root, capsys
):
    # A model option the UNet rejects: found after the data check, when the model is built.
    bad = "model.params.unet_config.params.num_classes=10"
    assert train_cli(tmp_path, class_root, bad) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model:") and "num_classes" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_background_saving_writes_what_the_loop_would(tmp_path, class_root, monkeypatch):
    """train.async_save: every file of every save point is what the loop writes itself, bitwise
    (the config aside, which names the switch), although the writer is slow and training goes
    on changing the weights while it writes."""
    writers = []

    def slow(payload, path, real=saving.save_checkpoint):
        writers.append(threading.current_thread().name)
        time.sleep(0.3)
        real(payload, path)

    monkeypatch.setattr(saving, "save_checkpoint", slow)
    # Best at 1 (in memory), 2 (a save point: linked), 3 (in memory, written at 4). fp32 step
    # files: made of the live weights (an fp16 file is a copy anyway).
    extra = ("train.max_steps=5", "train.save_every=2", "train.val_every=1", "train.keep_last=3")
    extra += ("train.lean_fp16=false",)
    files = {}
    for switch in ("false", "true"):
        scripted_validation(monkeypatch, {1: 5.0, 2: 4.0, 3: 3.0, 4: 6.0, 5: 7.0})
        logdir = tmp_path / switch
        assert train_cli(logdir, class_root, *extra, f"train.async_save={switch}") == 0
        ckpts = only_run(logdir) / "checkpoints"
        files[switch] = {p.name: load(p) for p in sorted(ckpts.iterdir())}
    assert set(writers) == {"MainThread", "checkpoints"}
    assert list(files["true"]) == ["best.ckpt", "last.ckpt"] + [
        f"step=00000{n}.ckpt" for n in (2, 4, 5)
    ]
    assert list(files["false"]) == list(files["true"])
    for name, payload in files["true"].items():
        expected = {k: v for k, v in files["false"][name].items() if k != "config"}
        assert_equal({k: v for k, v in payload.items() if k != "config"}, expected, name)


def assert_equal(a, b, where: str) -> None:
    """Nested dicts, lists and tensors equal, tensors bitwise."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}: {key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_background_saving_without_room_for_the_copy_saves_in_the_loop(
    tmp_path, class_root, monkeypatch, capsys
):
    writers = []

    def spy(payload, path, real=saving.save_checkpoint):
        writers.append(threading.current_thread().name)
        real(payload, path)

    monkeypatch.setattr(saving, "save_checkpoint", spy)
    monkeypatch.setattr(saving, "available_memory", lambda: 1000)
    extra = ("train.max_steps=4", "train.save_every=2", "train.async_save=true")
    assert train_cli(tmp_path, class_root, *extra) == 0
    assert writers and set(writers) == {"MainThread"}
    assert capsys.readouterr().out.count("saving in the loop instead") == 1
