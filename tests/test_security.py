"""Files from other people are data: hostile checkpoints, configs, photos and run folders, each
built here, never run code and never write outside the folders the user named; each is refused
with one line naming what is wrong. Memory (bombs, malformed files): test_security_memory.py."""

import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import EpsImagePlugin, Image

import main
from ldm.checkpoint import (
    save_checkpoint,
    save_safetensors,
)
from ldm.config_files import MAX_CONFIG_NODES, config_from_data, read_config_file
from ldm.data.images import DataError, load_rgb
from ldm.eval.generate import SamplingSettings, generate_images, plan_images
from ldm.eval.report import write_report
from ldm.sample import save_png
from ldm.train.logger import RunLogger
from ldm.util import ConfigError, instantiate_from_config, open_append
from scripts import evaluate

from .conftest import CONFIGS, build_tiny, load_script, tiny_config
from .train_helpers import TINY, small_config

export = load_script("export")
sample_prior = load_script("sample_prior")
txt2img = load_script("stable_txt2img")
DOG_PHOTOS = Path(__file__).resolve().parents[1] / "data" / "demo" / "dog"


def one_line_error(capsys) -> str:
    """stderr's one line (torch's own glog-style warnings from lazy imports aside)."""
    lines = [x for x in capsys.readouterr().err.splitlines() if not re.match(r"[WI]\d{4} ", x)]
    assert len(lines) == 1, lines
    return lines[0]


def files_under(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1 and 9: configs from files -------------------------------------------------------------


def command(marker) -> dict:
    """A config node that, if built, runs a shell command creating `marker`."""
    return {"target": "os.system", "params": {"command": f"touch {marker}"}}


def training_checkpoint(run, config: dict) -> Path:
    """A run folder whose last.ckpt loads with weights_only=True and carries `config`."""
    path = run / "checkpoints" / "last.ckpt"
    save_checkpoint({"state_dict": {}, "config": config, "train_state": {}}, path)
    return path


def test_a_checkpoint_config_never_runs_its_target(tmp_path, capsys):
    marker = tmp_path / "ran"
    config = OmegaConf.to_container(small_config(tmp_path / "class"))
    config["model"] = command(marker)
    run = tmp_path / "run"
    training_checkpoint(run, config)
    before = files_under(tmp_path)
    assert main.main(["-r", str(run), "-t", "--device", "cpu"]) == 1
    assert "config target 'os.system' is not allowed" in one_line_error(capsys)
    assert not marker.exists() and files_under(tmp_path) == before


def test_a_nested_target_in_a_config_file_is_refused_everywhere(tmp_path, capsys):
    marker = tmp_path / "ran"
    cfg = tiny_config("v1")
    cfg.model.params.cond_stage_config = command(marker)
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(OmegaConf.to_yaml(cfg))
    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint({"state_dict": build_tiny("v1").state_dict()}, ckpt)

    argv = ["--ckpt", str(ckpt), "--config", str(hostile), "--outdir", str(tmp_path / "out")]
    assert txt2img.main([*argv, "--H", "32", "--W", "32", "--device", "cpu"]) == 1
    assert "'os.system' is not allowed" in one_line_error(capsys)
    assert main.main(["-b", str(hostile), "-t", "-l", str(tmp_path / "logs")]) == 1
    assert "'os.system' is not allowed" in one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "logs").exists()


def test_safetensors_metadata_config_never_runs_its_target(tmp_path, capsys):
    marker = tmp_path / "ran"
    model = tmp_path / "model.safetensors"
    config = {"model": command(marker), "data": {"token": "sks"}}
    save_safetensors({"x": torch.zeros(1)}, model, {"config": yaml.safe_dump(config)})
    argv = ["--ckpt", str(model), "--real_dir", str(DOG_PHOTOS), "--class_word", "dog"]
    argv += ["--outdir", str(tmp_path / "eval"), "--device", "cpu", "--num_prompts", "1"]
    assert evaluate.main(argv, evaluator=object()) == 1  # fails before any metric is taken
    assert "config target 'os.system' is not allowed" in one_line_error(capsys)
    assert not marker.exists()


def test_export_does_not_pass_on_a_hostile_config_unless_trusted(tmp_path, capsys):
    ckpt = training_checkpoint(tmp_path / "run", {"model": command(tmp_path / "ran")})
    out = tmp_path / "out.safetensors"
    assert export.main(["--ckpt", str(ckpt), "--out", str(out)]) == 1
    assert "'os.system' is not allowed" in one_line_error(capsys) and not out.exists()
    assert export.main(["--ckpt", str(ckpt), "--out", str(out), "--unsafe_load"]) == 0
    assert not (tmp_path / "ran").exists()  # exporting copies the config; it builds nothing


def test_only_package_model_classes_unless_unsafe():
    for target in ("torch.nn.Linear", "ldm.util.importlib", "ldm.checkpoint.save_file"):
        with pytest.raises(ConfigError, match=f"config target '{target}'"):
            instantiate_from_config({"target": target, "params": {}})
    linear = {"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}}
    assert instantiate_from_config(linear, unsafe=True).weight.shape == (3, 2)
    # The permission reaches the configs a model builds inside itself.
    cfg = tiny_config("v1")
    cfg.model.params.first_stage_config.params.lossconfig = linear
    instantiate_from_config(cfg.model, unsafe=True)
    with pytest.raises(ConfigError, match="torch.nn.Linear"):
        instantiate_from_config(cfg.model)


def aliased_yaml(levels: int = 12, width: int = 8) -> str:
    """A few hundred bytes of YAML that expand to width**levels nodes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\nmodel: {}\n"


def shared_lists(levels: int = 40) -> dict:
    """A config whose lists are shared references: tiny as a pickle, 2**levels nodes as a tree."""
    node = ["x"]
    for _ in range(levels):
        node = [node, node]
    return {"model": {"params": {"bomb": node}}}


def test_config_bombs_are_refused_at_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(aliased_yaml())
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"bomb.yaml: more than {MAX_CONFIG_NODES} config"):
        read_config_file(path)
    assert main.main(["-b", str(path)]) == 1
    assert "more than" in one_line_error(capsys)

    run = tmp_path / "run"
    training_checkpoint(run, shared_lists())
    assert (run / "checkpoints" / "last.ckpt").stat().st_size < 10_000
    assert main.main(["-r", str(run), "-t"]) == 1
    assert f"last.ckpt: config: more than {MAX_CONFIG_NODES}" in one_line_error(capsys)
    assert time.perf_counter() - start < 10  # unbounded, each takes hours
    # A few aliases are fine: only the expanded size counts.
    small = "base: &b {lr: 1.0e-4}\nmodel: {params: *b}\n"
    assert config_from_data(small, "small").model.params.lr == 1.0e-4


def test_interpolations_from_files_are_never_resolved(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DB_SECRET", "hunter2")
    config = OmegaConf.to_container(small_config(tmp_path / "class"))
    config["data"]["token"] = "${oc.env:DB_SECRET}"
    ckpt = training_checkpoint(tmp_path / "run", config)
    out = tmp_path / "out.safetensors"
    assert export.main(["--ckpt", str(ckpt), "--out", str(out), "--unsafe_load"]) == 1
    assert "data.token holds an interpolation" in one_line_error(capsys)
    assert main.main(["-r", str(tmp_path / "run")]) == 1  # printing the config would resolve it
    assert "hunter2" not in one_line_error(capsys)
    model = tmp_path / "model.safetensors"
    save_safetensors({"x": torch.zeros(1)}, model, {"config": yaml.safe_dump(config)})
    argv = ["--ckpt", str(model), "--real_dir", str(DOG_PHOTOS), "--class_word", "dog"]
    assert evaluate.main([*argv, "--outdir", str(tmp_path / "eval")], evaluator=object()) == 1
    assert "config: data.token holds an interpolation" in one_line_error(capsys)
    assert not any(b"hunter2" in data for data in files_under(tmp_path).values())


# --- 2: photos -------------------------------------------------------------------------


def test_photos_are_decoded_only_in_the_accepted_formats(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"

    def ghostscript(*args, **kwargs):  # stands for the real one, which runs `gs` on the file
        marker.touch()
        raise OSError("Ghostscript ran")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    photos = tmp_path / "photos"
    photos.mkdir()
    eps = "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"
    (photos / "00.jpg").write_text(eps)
    with pytest.raises(DataError, match="00.jpg: not a JPEG, PNG, WEBP, BMP, TIFF image"):
        load_rgb(photos / "00.jpg")
    argv = ["-b", str(TINY), "-t", "--data_root", str(photos), "--class_word", "dog"]
    assert main.main([*argv, "-l", str(tmp_path / "logs")]) == 1
    assert "00.jpg: not a JPEG" in one_line_error(capsys)
    assert not marker.exists() and not (tmp_path / "logs").exists()


# --- 3, 4 and 5: writes stay inside the folders the user named -------------------------------


def planted_link(path: Path, victim: Path) -> Path:
    """A symbolic link at `path` to `victim`, a file someone wants kept as it is."""
    victim.write_text("precious")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(victim)
    return victim


def test_class_images_never_write_through_planted_links(tmp_path):
    folder = tmp_path / "class"
    victims = [
        planted_link(folder / ".prior_00000.png.tmp", tmp_path / "a"),  # the old temporary name
        planted_link(folder / "prior_00001.png", tmp_path / "b"),  # dangling would count as free
    ]
    (tmp_path / "b").unlink()
    ckpt = tmp_path / "base.ckpt"
    save_checkpoint({"state_dict": build_tiny("v1").state_dict()}, ckpt)
    argv = ["--config", str(CONFIGS / "stable-diffusion" / "v1-tiny.yaml"), "--ckpt", str(ckpt)]
    argv += ["--class_word", "dog", "--outdir", str(folder), "--num", "2", "--steps", "2"]
    assert sample_prior.main([*argv, "--size", "32", "--device", "cpu"]) == 0
    assert victims[0].read_text() == "precious" and not victims[1].exists()
    for name in ("prior_00000.png", "prior_00001.png"):
        assert not (folder / name).is_symlink() and load_rgb(folder / name).size == (32, 32)
    save_png(Image.new("RGB", (4, 4)), folder / "prior_00000.png")  # again, over a real file
    assert victims[0].read_text() == "precious"


def test_resume_takes_only_a_checkpoint_inside_a_run(tmp_path, capsys):
    home = tmp_path / "home"
    config = OmegaConf.to_container(small_config(tmp_path / "class"))
    friend = home / "Downloads" / "friend.ckpt"
    save_checkpoint({"state_dict": {}, "config": config, "train_state": {}}, friend)
    (home / "checkpoints").mkdir()
    (home / "checkpoints" / "step=000001.ckpt").write_text("someone's file")
    before = files_under(home), sorted(home.rglob("*"))
    assert main.main(["-r", str(friend), "-t", "--device", "cpu"]) == 1
    assert "friend.ckpt: not in a run folder's checkpoints/" in one_line_error(capsys)
    assert (files_under(home), sorted(home.rglob("*"))) == before


def test_logs_and_reports_never_write_through_planted_links(tmp_path, tiny_v1):
    run = tmp_path / "run"
    victim = planted_link(run / "metrics.csv", tmp_path / "metrics")
    with pytest.raises(DataError, match="metrics.csv: is a symbolic link"):
        RunLogger(run, start_step=0, max_steps=1)
    out = run / "eval"
    victim_index = planted_link(out / "index.jsonl", tmp_path / "index")
    specs = plan_images("subject", ["a dog"], 1, seed=0)
    with pytest.raises(DataError, match="index.jsonl: is a symbolic link"):
        generate_images(tiny_v1, out, specs, SamplingSettings(height=32, width=32), progress=False)
    reports = [planted_link(out / f"report.{x}", tmp_path / f"report{x}") for x in ("json", "md")]
    write_report(out, {"metrics": {}}, "# report")
    assert (out / "report.md").read_text() == "# report\n" and not (out / "report.md").is_symlink()
    assert all(v.read_text() == "precious" for v in [victim, victim_index, *reports])
    # A resume from an older step rewrites metrics.csv: through a fresh file, not the old name.
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n")
    victim_tmp = planted_link(run / ".metrics.csv.tmp", tmp_path / "tmp")
    RunLogger(run, start_step=2, max_steps=3).close()
    assert (run / "metrics.csv").read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]
    assert all(v.read_text() == "precious" for v in [victim, victim_index, victim_tmp, *reports])
    os.mkfifo(run / "fifo.csv")  # opening it to write would wait for a reader forever
    with pytest.raises(DataError, match="fifo.csv: cannot be opened"):
        open_append(run / "fifo.csv")
