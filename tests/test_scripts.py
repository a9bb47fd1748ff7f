"""scripts/export.py and scripts/sample_prior.py end to end on tiny checkpoints."""

import pytest
import torch
from safetensors import safe_open

from ldm.checkpoint import load_model_from_config, save_checkpoint

from .conftest import CONFIGS, build_tiny, load_script
from .train_helpers import run, small_config, weights

export = load_script("export")
sample_prior = load_script("sample_prior")
txt2img = load_script("stable_txt2img")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run with EMA: (config, run folder)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = small_config(
        root / "class", "train.ema.enabled=true", "train.ema.decay=0.5", "train.max_steps=2"
    )
    return cfg, run(cfg, root / "run")[1]


def test_a_training_checkpoint_samples_in_txt2img_with_the_run_config(trained, tmp_path):
    _, folder = trained
    (config,) = folder.configs.glob("*-project.yaml")
    argv = [
        "--ckpt", str(folder.last), "--config", str(config), "--outdir", str(tmp_path),
        "--prompt", "a photo of sks dog", "--H", "32", "--W", "32", "--n_samples", "2",
        "--n_iter", "1", "--ddim_steps", "2", "--device", "cpu",
    ]  # fmt: skip
    assert txt2img.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert txt2img.main([*argv, "--use_ema"]) == 0
    plain, ema = (tmp_path / "samples" / "00000.png"), (tmp_path / "samples" / "00002.png")
    assert plain.read_bytes() != ema.read_bytes()


def test_export_keeps_the_sd_layout_and_picks_ema_weights(trained, tmp_path):
    cfg, folder = trained
    trained = weights(folder.last)
    out = tmp_path / "lean.safetensors"
    assert export.main(["--ckpt", str(folder.last), "--out", str(out), "--half", "--use_ema"]) == 0
    with safe_open(out, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert f.get_tensor("alphas_cumprod").dtype == torch.float32
    assert not any(k.startswith("model_ema.") for k in keys)
    assert "unet_config" in metadata["config"] and "train:" in metadata["config"]
    model = load_model_from_config(cfg, out)  # strict
    key = "model.diffusion_model.out.2.weight"
    ema = trained["model_ema.diffusion_modelout2weight"]
    assert torch.equal(model.state_dict()[key], ema.half().float())
    assert not torch.equal(ema, trained[key])

    as_ckpt = tmp_path / "lean.ckpt"
    assert export.main(["--ckpt", str(folder.last), "--out", str(as_ckpt)]) == 0
    lean = torch.load(as_ckpt, weights_only=True)
    assert set(lean) == {"state_dict", "config"}
    assert torch.equal(lean["state_dict"][key], trained[key])


def test_export_errors_are_one_line(tmp_path, capsys):
    plain = tmp_path / "plain.ckpt"
    save_checkpoint({"state_dict": build_tiny("v1").state_dict()}, plain)
    assert export.main(["--ckpt", str(plain), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "holds no config; pass --config" in capsys.readouterr().err
    args = ["--ckpt", str(plain), "--out", str(tmp_path / "x.ckpt"), "--use_ema"]
    assert export.main([*args, "--config", str(CONFIGS / "stable-diffusion" / "v1-tiny.yaml")]) == 1
    assert "has no EMA weights" in capsys.readouterr().err


def test_sample_prior_fills_the_folder_once(tmp_path):
    ckpt = tmp_path / "base.ckpt"
    save_checkpoint({"state_dict": build_tiny("v1").state_dict()}, ckpt)
    args = [
        "--config", str(CONFIGS / "stable-diffusion" / "v1-tiny.yaml"), "--ckpt", str(ckpt),
        "--class_word", "dog", "--outdir", str(tmp_path / "dog"), "--num", "3",
        "--batch_size", "2", "--steps", "2", "--size", "32", "--device", "cpu",
    ]  # fmt: skip
    assert sample_prior.main(args) == 0
    files = sorted(p.name for p in (tmp_path / "dog").iterdir())
    assert files == ["prior_00000.png", "prior_00001.png", "prior_00002.png"]
    before = {name: (tmp_path / "dog" / name).read_bytes() for name in files}
    assert sample_prior.main(args) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "dog").iterdir()} == before
