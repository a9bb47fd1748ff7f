"""Whole runs through main.py: exact resume, stop signals, DDP equivalence, class-image sampling,
the command line and the demo."""

import io
import subprocess
import sys

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.train.config import load_config
from ldm.train.prior import missing_indices, sample_class_images
from ldm.train.state import run_dir_of

from .conftest import ROOT, build_tiny, tiny_config
from .train_helpers import (
    TINY,
    base_checkpoint,
    full_and_resumed_runs,
    metrics,
    one_and_two_processes,
    small_config,
    small_overrides,
    weights,
)


def only_run(logdir):
    (folder,) = [p for p in logdir.iterdir() if p.is_dir()]
    return folder


def train_cli(logdir, class_root, *extra: str) -> int:
    return main.main(
        ["-b", str(TINY), "-t", "-l", str(logdir), *small_overrides(class_root, *extra)]
    )


def test_resume_after_a_stop_signal_reproduces_the_uninterrupted_run(
    tmp_path, class_root, monkeypatch
):
    extra = ("train.max_steps=4", "train.save_every=0", "train.ema.enabled=true", "data.flip_p=0.5")
    argv = ["-b", str(TINY), "-t", *small_overrides(class_root, *extra)]
    full, cut = full_and_resumed_runs(tmp_path, argv, monkeypatch)
    resumed, uninterrupted = (
        weights(cut / "checkpoints" / "last.ckpt"),
        weights(full / "checkpoints" / "last.ckpt"),
    )
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_two_processes_of_batch_b_match_one_of_batch_2b(tmp_path, class_root):
    """SD v2 (penultimate-layer conditioning) with its text encoder trained, under DDP: what the
    conditioning never uses is frozen, so every trained parameter gets a gradient on each rank."""
    v2 = tmp_path / "v2.yaml"  # the demo's run settings on the tiny SD v2 model
    settings = OmegaConf.load(TINY)
    settings.model = tiny_config("v2").model
    OmegaConf.save(settings, v2)
    # 64 channels: with 32, GroupNorm's groups are single channels and the biases before one
    # get an exactly-zero gradient, whose rounding noise Adam scales up to lr-sized steps.
    extra = ["model.params.unet_config.params.model_channels=64", "train.max_steps=2"]
    base = base_checkpoint(
        tmp_path / "base.ckpt", load_config([v2], small_overrides(class_root, *extra))
    )
    extra += ["train.lr=1e-3", "train.trainable=[unet,text_encoder]", f"train.actual_resume={base}"]
    a, b = one_and_two_processes(tmp_path, v2, small_overrides(class_root, *extra))
    wa, wb = weights(a / "checkpoints" / "last.ckpt"), weights(b / "checkpoints" / "last.ckpt")
    start = torch.load(base, weights_only=True)["state_dict"]
    for part in ("model.diffusion_model.", "cond_stage_model.model.transformer."):
        keys = [k for k in wa if k.startswith(part)]
        diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in keys])
        # Adam divides by |gradient| + eps: where the true gradient is ~0 (k-biases of attention,
        # whose shift softmax ignores; a few other weights), rounding noise becomes an lr-sized
        # step of either sign. Those are ~3e-5 of the weights; a real mismatch moves nearly all.
        assert (diff > 1e-5).float().mean() < 1e-3, part
        moved = torch.cat([(wa[k] - start[k]).abs().flatten() for k in keys])
        assert moved.median() > 1e-4, part  # it did train
    unused = ["text_projection", "logit_scale", "transformer.resblocks.2."]  # the last block
    for key in [k for k in wa if any(u in k for u in unused)]:
        assert torch.equal(wa[key], start[key]) and torch.equal(wb[key], start[key]), key


def test_class_image_shortfall_is_filled_deterministically(tmp_path):
    model = build_tiny("v1")
    cfg = small_config(tmp_path / "unused")
    folder = tmp_path / "class"
    folder.mkdir()
    for name in ("mine_a.png", "mine_b.png"):  # the user's own class images count
        (folder / name).write_bytes((ROOT / "data" / "demo" / "dog" / "00.jpg").read_bytes())
    prior = cfg.prior
    prior.num_class_images = 5
    assert fill(model, folder, prior) == 3
    generated = sorted(p.name for p in folder.glob("prior_*.png"))
    assert generated == ["prior_00000.png", "prior_00001.png", "prior_00002.png"]
    first = {name: (folder / name).read_bytes() for name in generated}
    assert fill(model, folder, prior) == 0

    # A rerun writes the same files, bit for bit.
    for path in folder.glob("prior_*.png"):
        path.unlink()
    fill(model, folder, prior)
    assert {name: (folder / name).read_bytes() for name in generated} == first

    # An interrupted run resumes to the same images, and two ranks split the work to them; the
    # batches differ then, which may move a pixel by a rounding step.
    (folder / "prior_00001.png").unlink()
    assert fill(model, folder, prior) == 1
    assert same_pixels(folder / "prior_00001.png", first["prior_00001.png"])
    split = tmp_path / "split"
    split.mkdir()
    prior.num_class_images = 3
    todo = missing_indices(split, prior.num_class_images)
    for rank in (1, 0):
        sample_class_images(model, split, "a photo of dog", prior, 32, "32", todo[rank::2], False)
    assert sorted(p.name for p in split.iterdir()) == generated
    assert all(same_pixels(split / name, first[name]) for name in generated)


def fill(model, folder, prior) -> int:
    todo = missing_indices(folder, prior.num_class_images)
    return sample_class_images(model, folder, "a photo of dog", prior, 32, "32", todo, False)


def same_pixels(path, png: bytes) -> bool:
    a = np.asarray(Image.open(path), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
    return a.shape == b.shape and np.abs(a - b).max() <= 1


def test_config_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    missing.write_text(TINY.read_text().replace("scale_factor: 0.18215", "scale_factor: ???"))
    cases = [
        (["-b", str(TINY), "-t", "train.max_step=3"], "max_step"),
        (["-b", str(tmp_path / "nope.yaml"), "-t"], "nope.yaml: no such config file"),
        (["-b", str(TINY), "-t", "train.precision=fp8"], "train.precision"),
        (["-b", str(TINY), "-t", "train.trainable=[vae]"], "train.trainable"),
        (["-b", str(TINY), "-t", "prior.sampler=euler"], "prior.sampler: 'euler' (choose from"),
        (["-b", str(TINY), "-t", "--data_root", str(tmp_path)], f"{tmp_path}"),
        (["-r", str(tmp_path / "run"), "-b", str(TINY)], "key=value"),
        (["-t"], "pass a config with -b"),
        (["-b", str(TINY), "train.max_steps=0", "-t"], "train.max_steps"),  # an override after -b
        (["-b", str(missing), "-t"], "no value for model.params.scale_factor"),
    ]
    for argv, needle in cases:
        assert main.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)


def test_flags_map_to_config_keys(capsys):
    args = ["-b", str(TINY), "--scale_lr", "--class_word", "cat", "--token", "zwx", "-s", "7"]
    assert main.main([*args, "train.max_steps=9"]) == 0  # without -t: prints the resolved config
    out = capsys.readouterr().out
    for line in ("scale_lr: true", "class_word: cat", "token: zwx", "seed: 7", "max_steps: 9"):
        assert line in out
    assert main.main(["-b", str(TINY), "--scale_lr", "false"]) == 0
    assert "scale_lr: false" in capsys.readouterr().out


def test_resume_paths():
    run, ckpt = run_dir_of("logs/x")
    assert ckpt.parts[-2:] == ("checkpoints", "last.ckpt")
    run, ckpt = run_dir_of("logs/x/checkpoints/step=000010.ckpt")
    assert run.root.name == "x"


def test_demo_command_end_to_end(tmp_path):
    """The README's demo command (shortened by overrides), in a fresh process."""
    command = [
        sys.executable, "main.py", "--base", "configs/dreambooth/demo.yaml", "-t", "-l", str(tmp_path / "logs"),
        f"data.class_root={tmp_path / 'class'}", "prior.num_class_images=2", "train.max_steps=4",
        "train.save_every=2", "train.keep_last=2", "train.val_every=2", "train.sample.every=4",
        "train.sample.ddim_steps=2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = only_run(tmp_path / "logs")
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for expected in (
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "checkpoints/step=000002.ckpt",
        "checkpoints/step=000004.ckpt",
        "images/step=000004.png",
        "metrics.csv",
    ):
        assert expected in names
    assert any(n.startswith("configs/") and n.endswith("-project.yaml") for n in names)
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert len(metrics(folder)) == 4
    assert len(list((tmp_path / "class").glob("prior_*.png"))) == 2
