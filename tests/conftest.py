"""Shared fixtures: tiny models of the real classes, built from the repo's tiny configs."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def tiny_config(version: str = "v1"):
    return OmegaConf.load(CONFIGS / "stable-diffusion" / f"{version}-tiny.yaml")


def build_tiny(version: str = "v1", seed: int = 0):
    """A tiny LatentDiffusion with random (seeded) weights; output layers are zero-initialised
    as in SD, so they are randomised too, or the UNet would predict exactly 0."""
    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_config(version).model)
    with torch.no_grad():
        for p in model.model.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_v1():
    return build_tiny("v1")


@pytest.fixture(scope="session")
def tiny_v2():
    return build_tiny("v2")


def load_script(name: str):
    """Import scripts/<name>.py as a module, so tests call its main() in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def class_root(tmp_path_factory):
    """A class-image folder per test module: its first run samples the images, the rest reuse
    them."""
    return tmp_path_factory.mktemp("class_images")
