"""Tiny training runs for the tests: the demo config shrunk to 32 px and a few steps."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from ldm.checkpoint import save_checkpoint
from ldm.train import loop
from ldm.train.config import load_config
from ldm.train.distributed import DistEnv
from ldm.train.evaluation import Validation
from ldm.train.loop import train
from ldm.train.state import RunDir
from ldm.util import instantiate_from_config

from .conftest import ROOT

TINY = ROOT / "configs" / "dreambooth" / "tiny-random.yaml"
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def small_overrides(class_root: Path, *extra: str) -> list[str]:
    return [
        "data.size=32",
        f"data.class_root={class_root}",
        "prior.num_class_images=2",
        "prior.ddim_steps=2",
        "train.max_steps=3",
        "train.log_every=1",
        "train.val_every=0",
        "train.save_every=0",
        "train.sample.every=0",
        *extra,
    ]


def small_config(class_root: Path, *extra: str):
    return load_config([TINY], small_overrides(class_root, *extra))


def base_checkpoint(path: Path, cfg) -> Path:
    """A "pretrained" base in the SD layout: the tiny model with its zero-initialised output
    layers randomised, so every part has a gradient (a zero UNet output layer blocks all)."""
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    save_checkpoint({"state_dict": model.state_dict()}, path)
    return path


def run(cfg, root: Path):
    """Train in-process on the CPU; returns (final state, run folder)."""
    folder = RunDir(root)
    folder.create()
    return train(cfg, folder, CPU), folder


def metrics(root: Path) -> list[dict[str, str]]:
    with open(root / "metrics.csv") as f:
        return list(csv.DictReader(f))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def hparams_record(root: Path) -> tuple[dict, dict[str, float], bool]:
    """A run's TensorBoard HParams session: (hyperparameters, metric scalars, whether it ended)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams, scalars, ended = {}, {}, False
    path = root / "tensorboard" / "hparams" / "events.out.tfevents.hparams"
    for raw in RawEventFileLoader(str(path)).Load():
        for value in Event.FromString(raw).summary.value:
            if value.metadata.plugin_data.plugin_name != "hparams":
                scalars[value.tag] = value.simple_value
                continue
            data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            if data.HasField("session_start_info"):
                for key, v in data.session_start_info.hparams.items():
                    hparams[key] = getattr(v, v.WhichOneof("kind"))
            ended = ended or data.HasField("session_end_info")
    return hparams, scalars, ended


def scripted_validation(monkeypatch, losses: dict[int, float]) -> None:
    """Validation losses by step, so that the test decides where the best is."""
    calls = {"n": 0}

    def loss(self, model, precision):
        calls["n"] += 1
        return losses[calls["n"]]

    monkeypatch.setattr(Validation, "loss", loss)


def one_and_two_processes(logdir: Path, config: Path, overrides: list[str]) -> tuple[Path, Path]:
    """The same run as one CPU process of batch 2 and as two of batch 1 (main.py --gpus 0,1:
    torchrun, gloo on the CPU); their run folders, once their per-step losses and gradient norms
    are found to agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-b", str(config), "-t", "--device", "cpu", *overrides]
    runs = []
    for name, flags in (
        ("one", ["train.batch_size=2"]),
        ("two", ["--gpus", "0,1", "train.batch_size=1"]),
    ):
        argv = [sys.executable, "main.py", "-l", str(logdir / name), *common, *flags]
        subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)
        (folder,) = [p for p in (logdir / name).iterdir() if p.is_dir()]
        runs.append(folder)
    for row_a, row_b in zip(metrics(runs[0]), metrics(runs[1]), strict=True):
        for key in ("loss", "loss_instance", "loss_prior", "grad_norm"):
            assert float(row_a[key]) == pytest.approx(float(row_b[key]), rel=1e-5), key
    return runs[0], runs[1]


def full_and_resumed_runs(logdir: Path, argv: list[str], monkeypatch) -> tuple[Path, Path]:
    """main.py `argv` (without -l) once uninterrupted and once stopped by a signal at step 2 and
    resumed; their run folders, once the resumed run's metrics (per-step losses, lr, grad norms)
    are found to be those of the uninterrupted one, bitwise as text."""
    assert main.main([*argv, "-l", str(logdir / "full")]) == 0
    periodic = loop.periodic

    def signal_at_step_2(cfg, env, run, session, *args):
        if session.state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return periodic(cfg, env, run, session, *args)

    monkeypatch.setattr(loop, "periodic", signal_at_step_2)
    assert main.main([*argv, "-l", str(logdir / "cut")]) == 0  # a stop signal exits cleanly
    monkeypatch.setattr(loop, "periodic", periodic)
    (full,), (cut,) = ([p for p in (logdir / n).iterdir() if p.is_dir()] for n in ("full", "cut"))
    # The signal arrives during step 2's logging; the loop stops at its next check.
    stopped = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert stopped in (2, 3) and len(metrics(cut)) == stopped
    assert main.main(["-r", str(cut), "-t"]) == 0
    assert metrics(cut) == metrics(full)
    return full, cut
