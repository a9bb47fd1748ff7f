"""The run folder and the training checkpoint: one dict, SD layout plus everything to resume.

`state_dict` holds the model in the Stable Diffusion checkpoint layout (`model_ema.*` included
when EMA is on), so the file loads in txt2img and other SD tools as it is. Beside it: optimizer,
GradScaler, lr scheduler, step, the text encoder's EMA, the resolved config and every RNG state.
All of it is plain tensors and containers, so it loads with `torch.load(weights_only=True)`.
"""

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import EMA_PREFIX, save_checkpoint, save_text
from ldm.util import ConfigError

STEP_CHECKPOINT = re.compile(r"^step=(\d{6,})\.ckpt$")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.ckpt"

    def create(self, cfg: DictConfig) -> None:
        for folder in (self.checkpoints, self.images, self.configs):
            folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
        save_text(OmegaConf.to_yaml(cfg, resolve=True), self.configs / f"{stamp}-project.yaml")


def new_run_dir(logdir: str | Path, name: str) -> RunDir:
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    return RunDir(Path(logdir) / f"{stamp}_{name}")


def run_dir_of(resume: str | Path) -> tuple[RunDir, Path]:
    """`-r` takes a run folder (its last.ckpt) or a checkpoint in a run's `checkpoints/`. A
    checkpoint anywhere else is refused: its folder two levels up would become the run folder,
    where resuming creates folders and prunes `step=*.ckpt` files."""
    path = Path(resume)
    if path.suffix != ".ckpt" and not path.is_file():
        return RunDir(path), RunDir(path).last
    if path.parent.name != "checkpoints":
        raise ConfigError(
            f"-r {path}: not in a run folder's checkpoints/; resume takes a run folder or "
            "RUN/checkpoints/*.ckpt (to start from other weights use --actual_resume)"
        )
    return RunDir(path.parent.parent), path


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state holds an ndarray, which weights_only loading refuses: store a tensor.
        "numpy": [
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            *numpy_state[2:],
        ],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tuples(state["python"]))


def _tuples(value):
    """random.setstate needs tuples where a round trip may have produced lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_payload(
    model, optimizer, scaler, scheduler, text_ema, cfg, step: int, train_state: dict
) -> dict:
    return {
        "state_dict": model.state_dict(),
        "global_step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "text_encoder_ema": text_ema.state_dict() if text_ema is not None else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rng": rng_state(),
        "train_state": dict(train_state),
    }


def ema_entries(state: dict) -> dict:
    """The LitEma buffers of a checkpoint's state dict, named as inside LitEma."""
    return {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}


def save_step(run: RunDir, payload: dict, step: int, keep_last: int) -> Path:
    """`step=NNNNNN.ckpt`, keeping the newest `keep_last` of them."""
    path = run.checkpoints / f"step={step:06d}.ckpt"
    save_checkpoint(payload, path)
    numbered = sorted(p for p in run.checkpoints.iterdir() if STEP_CHECKPOINT.match(p.name))
    for old in numbered[: max(0, len(numbered) - keep_last)]:
        old.unlink()
    return path
