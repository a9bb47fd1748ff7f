"""diffusers model folders in and out: a folder written by diffusers loads strictly into the ldm
modules, comes back out bitwise, and diffusers' own pipeline on our export draws the image our
txt2img draws."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ldm.checkpoint import CheckpointError, load_model_from_config, save_checkpoint
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.sample import seeded_noise

from .conftest import CONFIGS, build_tiny, load_script, tiny_config
from .diffusers_helpers import folder_tensors, pipeline_images, tiny_pipeline

export = load_script("export")
txt2img = load_script("stable_txt2img")


def tiny_yaml(version: str) -> str:
    return str(CONFIGS / "stable-diffusion" / f"{version}-tiny.yaml")


@pytest.fixture(scope="module", params=["v1", "v2"])
def folder(request, tmp_path_factory):
    """(version, a diffusers folder saved by diffusers' save_pretrained)."""
    path = tmp_path_factory.mktemp("diffusers") / request.param
    tiny_pipeline(request.param).save_pretrained(path)
    return request.param, path


def test_folder_to_ldm_to_folder_is_bitwise_for_every_tensor(folder, tmp_path):
    version, source = folder
    out = tmp_path / "out"
    args = ["--ckpt", str(source), "--config", tiny_yaml(version), "--format", "diffusers"]
    assert export.main([*args, "--out", str(out)]) == 0
    before, after = folder_tensors(source), folder_tensors(out)
    assert set(after) == set(before)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    # and what diffusers reads back is the same model
    StableDiffusionPipeline.from_pretrained(out, local_files_only=True)


def test_folder_loads_into_ldm_as_the_same_network(folder):
    version, source = folder
    pipe = StableDiffusionPipeline.from_pretrained(source, local_files_only=True)
    model = load_model_from_config(tiny_config(version), source).eval()  # strict
    ids = model.cond_stage_model.tokenize(["a photo of sks dog"])
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        ours_c = model.get_learned_conditioning(ids)
        theirs_c = pipe.text_encoder(ids)[0]
        ours = model.apply_model(x, t, ours_c)
        theirs = pipe.unet(x, t, encoder_hidden_states=ours_c).sample
    assert (ours_c - theirs_c).abs().max() < 1e-5
    # float32 rounding of different attention kernels; outputs are of order 1
    assert (ours - theirs).abs().max() < 1e-4 and ours.abs().mean() > 0.05


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_diffusers_pipeline_on_our_export_draws_our_image(version, tmp_path):
    model = build_tiny(version)
    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint({"state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "diffusers"
    args = ["--ckpt", str(ckpt), "--config", tiny_yaml(version), "--format", "diffusers"]
    assert export.main([*args, "--out", str(out)]) == 0

    prompt, seed, steps, scale = "a photo of sks dog on the beach", 42, 4, 7.5
    run = [
        "--ckpt", str(ckpt), "--config", tiny_yaml(version), "--outdir", str(tmp_path / "ours"),
        "--prompt", prompt, "--H", "64", "--W", "64", "--n_samples", "2", "--n_iter", "1",
        "--ddim_steps", str(steps), "--scale", str(scale), "--seed", str(seed), "--device", "cpu",
    ]  # fmt: skip
    assert txt2img.main(run) == 0
    ours = [
        np.asarray(Image.open(p)) for p in sorted((tmp_path / "ours" / "samples").glob("*.png"))
    ]
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    theirs = pipeline_images(pipe, prompt, seeded_noise([seed, seed + 1], (4, 8, 8)), steps, scale)
    # The same DDIM steps on the same weights: float32 rounding apart (<1e-4 before
    # quantisation), so at most one level of 255.
    for a, b in zip(ours, theirs, strict=True):
        assert a.std() > 5 and np.abs(a.astype(int) - b).max() <= 1
    # And the latents before decoding, in float32, which shows what one level of 255 can hide
    # on random weights (DDIM timesteps off by one, say).
    x_T = seeded_noise([seed], (4, 8, 8))
    model = load_model_from_config(tiny_config(version), ckpt).eval()
    with torch.no_grad():
        z, _ = DDIMSampler(model).sample(
            S=steps, batch_size=1, shape=(4, 8, 8),
            conditioning=model.get_learned_conditioning([prompt]),
            unconditional_conditioning=model.get_learned_conditioning([""]),
            unconditional_guidance_scale=scale, x_T=x_T.clone(),
        )  # fmt: skip
        theirs_z = pipe(
            [prompt], num_inference_steps=steps, guidance_scale=scale, latents=x_T.clone(),
            height=64, width=64, output_type="latent",
        ).images  # fmt: skip
    assert (z - theirs_z).abs().max() < 1e-4 * z.abs().max()


def test_main_actual_resume_takes_a_folder(folder):
    from ldm.train.config import load_config
    from ldm.train.setup import build_model

    version, source = folder
    if version == "v2":
        pytest.skip("the demo config is SD v1")
    cfg = load_config(
        [CONFIGS / "dreambooth" / "tiny-random.yaml"], [f"train.actual_resume={source}"]
    )
    model = build_model(cfg, None, False)
    reference = load_model_from_config(tiny_config("v1"), source)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def _broken(folder, tmp_path, case: str):
    path = tmp_path / "broken"
    shutil.copytree(folder, path)
    if case == "no unet weights":
        (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif case == "other heads":
        config = json.loads((path / "unet" / "config.json").read_text())
        config["attention_head_dim"] = 4
        (path / "unet" / "config.json").write_text(json.dumps(config))
    elif case == "huge config":
        config = json.loads((path / "unet" / "config.json").read_text())
        config["padding"] = "x" * 2**20
        (path / "unet" / "config.json").write_text(json.dumps(config))
    elif case == "extra tensor":
        from safetensors.torch import load_file, save_file

        file = path / "vae" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(file)
        tensors["encoder.extra.weight"] = torch.zeros(2)
        save_file(tensors, file)
    return path


@pytest.mark.parametrize(
    "case, config, expected",
    [
        ("no unet weights", "v1", "unet: no weights (diffusion_pytorch_model.safetensors"),
        ("other heads", "v1", "does not match the config: unet.heads [4, 4] vs [2, 2]"),
        ("extra tensor", "v1", "1 unexpected keys (vae/encoder.extra.weight)"),
        ("huge config", "v1", "unet/config.json: larger than 1048576 bytes; refused"),
        ("as is", "v2", "the folder is SD v1 (CLIP text encoder) but the config builds SD v2"),
    ],
)
def test_bad_folders_are_one_line_errors(folder, tmp_path, capsys, case, config, expected):
    version, source = folder
    if version != "v1":
        pytest.skip("the cases are built from the v1 folder")
    path = source if case == "as is" else _broken(source, tmp_path, case)
    with pytest.raises(CheckpointError, match=None) as e:
        load_model_from_config(tiny_config(config), path)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    run = ["--ckpt", str(path), "--config", tiny_yaml(config), "--outdir", str(tmp_path / "o")]
    assert txt2img.main([*run, "--device", "cpu", "--H", "64", "--W", "64"]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
