"""scripts/stable_txt2img.py end to end on tiny checkpoints in the real layout: files, numbering,
seeding, EMA, negative prompts, prompt files, and one-line errors."""

import importlib.util

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoint import ema_key, save_checkpoint

from .conftest import ROOT
from .test_checkpoint import real_layout

_spec = importlib.util.spec_from_file_location("stable_txt2img", ROOT / "scripts/stable_txt2img.py")
txt2img = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(txt2img)

TINY_V1 = str(ROOT / "configs/stable-diffusion/v1-tiny.yaml")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_v1):
    """A full-EMA v1 checkpoint: loads with and without --use_ema."""
    sd = real_layout(tiny_v1, with_ema=True)
    # A plausible EMA, near the live weights (real_layout's +1 makes the tiny UNet give NaNs).
    for key, value in tiny_v1.model.state_dict(prefix="model.").items():
        sd[ema_key(key)] = value * 0.9
    path = tmp_path_factory.mktemp("ckpt") / "tiny-full-ema.ckpt"
    save_checkpoint({"state_dict": sd, "global_step": 1}, path)
    return path


def argv(ckpt, outdir, *args: str) -> list[str]:
    """The tiny v1 model: 64x64, 4 steps, batches of 2, one round; `args` last."""
    base = ["--ckpt", str(ckpt), "--config", TINY_V1, "--outdir", str(outdir), "--device", "cpu"]
    base += ["--H", "64", "--W", "64", "--ddim_steps", "4", "--n_samples", "2", "--n_iter", "1"]
    return base + list(args)


def run(ckpt, outdir, *args: str) -> list[np.ndarray]:
    """Run the script and return every sample in outdir, in file order."""
    assert txt2img.main(argv(ckpt, outdir, *args)) == 0
    return [read_png(p) for p in sorted((outdir / "samples").glob("*.png"))]


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_writes_numbered_samples_and_a_grid_and_continues_numbering(tmp_path, ckpt):
    images = run(ckpt, tmp_path, "--W", "80", "--n_iter", "2")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        f"{i:05}.png" for i in range(4)
    ]
    assert all(image.shape == (64, 80, 3) for image in images)
    # A row per batch of 2, 2 px padding around and between the images.
    assert read_png(tmp_path / "grid-0000.png").shape == (2 * 66 + 2, 2 * 82 + 2, 3)

    run(ckpt, tmp_path, "--W", "80", "--prompt", "another prompt")
    assert sorted(p.name for p in (tmp_path / "samples").iterdir())[-2:] == [
        "00004.png",
        "00005.png",
    ]
    assert read_png(tmp_path / "grid-0001.png").shape == (66 + 2, 2 * 82 + 2, 3)


def test_seed_determines_the_images(tmp_path, ckpt):
    first = run(ckpt, tmp_path / "a", "--n_iter", "2")
    assert same(first, run(ckpt, tmp_path / "b", "--n_iter", "2"))
    assert not any(np.array_equal(x, y) for x, y in zip(first[:-1], first[1:]))
    other_seed = run(ckpt, tmp_path / "c", "--n_iter", "2", "--seed", "7")
    assert not any(np.array_equal(x, y) for x, y in zip(first, other_seed))
    # Image k starts from seed + k: image 1 of seed 42, redone alone with seed 43 (a batch of
    # one instead of two, so the float sums may differ in the last bit).
    alone = run(ckpt, tmp_path / "d", "--seed", "43", "--n_samples", "1")
    assert np.abs(alone[0].astype(int) - first[1]).max() <= 1


def test_fixed_code_repeats_the_first_rounds_images(tmp_path, ckpt):
    images = run(ckpt, tmp_path, "--n_iter", "2", "--fixed_code")
    assert same(images[:2], images[2:])
    assert not np.array_equal(images[0], images[1])


def test_use_ema_samples_with_the_ema_weights(tmp_path, ckpt):
    live = run(ckpt, tmp_path / "live")
    ema = run(ckpt, tmp_path / "ema", "--use_ema")
    assert all(image.std() > 10 for image in live + ema)  # images, not a NaN-black square
    assert not any(np.array_equal(x, y) for x, y in zip(live, ema))


def test_negative_prompt_changes_the_images(tmp_path, ckpt):
    plain = run(ckpt, tmp_path / "plain")
    negative = run(ckpt, tmp_path / "negative", "--negative_prompt", "blurry, low quality")
    assert not any(np.array_equal(x, y) for x, y in zip(plain, negative))


def test_from_file_samples_each_line(tmp_path, ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog\n\na red car\na castle on a hill\n")
    images = run(ckpt, tmp_path / "file", "--from-file", str(prompts))
    assert len(images) == 3  # batches [dog, car] and [castle]; the blank line is skipped
    # Alone in its batch both times: CPU kernels may round differently at another batch size.
    castle = run(
        ckpt, tmp_path / "castle", "--prompt", "a castle on a hill", "--seed", "44",
        "--n_samples", "1",
    )  # fmt: skip
    assert np.array_equal(images[2], castle[0])


def _write_v2(tmp_path, tiny_v2):
    path = tmp_path / "tiny-v2.ckpt"
    save_checkpoint({"state_dict": real_layout(tiny_v2)}, path)
    return path


def _write_empty_prompts(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    return path


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing ckpt", "nope.ckpt: no such checkpoint file"),
        ("v2 ckpt, v1 config", "the file is SD v2 (OpenCLIP text encoder) but the config builds"),
        ("bad H", "--H 60: must be a positive multiple of 16"),
        ("empty prompt file", "empty.txt: has no prompts"),
        ("too many steps", "--ddim_steps 2000: the model has 1000 timesteps"),
        ("eta with dpmpp_2m", "--ddim_eta 0.5: dpmpp_2m is deterministic (use ddim)"),
        ("outdir is a file", "out.png: exists and is not a folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, ckpt, tiny_v2, capsys, case, expected):
    args = {
        "missing ckpt": lambda: ["--ckpt", str(tmp_path / "nope.ckpt")],
        "v2 ckpt, v1 config": lambda: ["--ckpt", str(_write_v2(tmp_path, tiny_v2))],
        "bad H": lambda: ["--H", "60"],
        "empty prompt file": lambda: ["--from-file", str(_write_empty_prompts(tmp_path))],
        "too many steps": lambda: ["--ddim_steps", "2000"],
        "eta with dpmpp_2m": lambda: ["--sampler", "dpmpp_2m", "--ddim_eta", "0.5"],
        "outdir is a file": lambda: ["--outdir", str(tmp_path / "out.png")],
    }[case]()
    if case == "outdir is a file":
        (tmp_path / "out.png").write_bytes(b"")
    assert txt2img.main(argv(ckpt, tmp_path / "out", *args)) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "samples").exists()
