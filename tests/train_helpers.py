"""Tiny training runs for the tests: the demo config shrunk to 32 px and a few steps."""

import csv
from pathlib import Path

import torch

from ldm.checkpoint import save_checkpoint
from ldm.train.config import load_config
from ldm.train.distributed import DistEnv
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
