"""The run folder and the checkpoints in it.

A full training checkpoint (last.ckpt) is one dict: `state_dict` holds the model in the Stable
Diffusion checkpoint layout (`model_ema.*` included when EMA is on), so the file loads in txt2img
and other SD tools as it is; beside it: optimizer, GradScaler, lr scheduler, step, the text
encoder's EMA, the resolved config and every process's RNG state. A lean checkpoint (step-numbered,
best) is the same dict without the optimizer and the other resume state. All of it is plain
tensors and containers, so it loads with `torch.load(weights_only=True)`.
"""

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import EMA_PREFIX, SaveError, half_precision, save_checkpoint, save_text
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

    def step_path(self, step: int) -> Path:
        return self.checkpoints / f"step={step:06d}.ckpt"

    def create(self) -> None:
        """The folders (the root exists already for a new run: `claim_run_dir` made it)."""
        try:
            for folder in (self.checkpoints, self.images, self.configs):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SaveError(f"{self.root}: cannot create the run folder ({e.strerror})") from None

    def write_config(self, cfg: DictConfig) -> None:
        """The resolved config, once set-up has accepted it (a failed resume leaves none)."""
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
        path, n = self.configs / f"{stamp}-project.yaml", 1
        while path.exists():  # a resume in the same second keeps the run's first config
            n += 1
            path = self.configs / f"{stamp}-{n}-project.yaml"
        save_text(OmegaConf.to_yaml(cfg, resolve=True), path)

    def remove_partial_files(self) -> list[str]:
        """Temporary checkpoint files a killed run left behind (each as big as a checkpoint)."""
        names = []
        for path in self.checkpoints.glob(".*.ckpt.*.tmp"):
            path.unlink(missing_ok=True)
            names.append(path.name)
        return sorted(names)

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.glob("*.ckpt"))


def claim_run_dir(logdir: str | Path, name: str) -> RunDir:
    """A new run folder `<logdir>/<timestamp>_<name>`, made here so that it belongs to this run:
    a second run started in the same second gets `..._<name>-2`."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    try:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            root = Path(logdir) / (f"{stamp}_{name}" + (f"-{n}" if n > 1 else ""))
            try:
                root.mkdir()
                return RunDir(root)
            except FileExistsError:
                continue
    except OSError as e:
        raise SaveError(f"{logdir}: cannot create a run folder there ({e.strerror})") from None
    raise SaveError(f"{logdir}: no free run folder name for {stamp}_{name}")


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
    state_dict: dict, optimizer, scaler, scheduler, text_ema, cfg, train_state: dict, rng: list
) -> dict:
    """A full training checkpoint: `rng` holds every process's RNG state, rank order."""
    return {
        **lean_payload(state_dict, cfg, train_state, half=False),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "text_encoder_ema": text_ema.state_dict() if text_ema is not None else None,
        "rng": rng,
        "world_size": len(rng),
    }


def lean_payload(state_dict: dict, cfg, train_state: dict, half: bool) -> dict:
    """The model in the SD layout (fp16 weights if `half`), its step, the config and the
    counters: what txt2img needs, and what a resume from it can take (with a fresh optimizer)."""
    if half:
        state_dict = {k: half_precision(k, v) for k, v in state_dict.items()}
    return {
        "state_dict": state_dict,
        "global_step": train_state["step"],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "train_state": dict(train_state),
    }


def is_lean(extras: dict) -> bool:
    """A checkpoint of this codebase without optimizer state (step-numbered or best)."""
    return "config" in extras and "train_state" in extras and "optimizer" not in extras


def ema_entries(state: dict) -> dict:
    """The LitEma buffers of a checkpoint's state dict, named as inside LitEma."""
    return {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}


def save_step(run: RunDir, payload: dict, step: int, keep_last: int) -> Path:
    """`step=NNNNNN.ckpt`, keeping the newest `keep_last` of them."""
    path = run.step_path(step)
    save_checkpoint(payload, path)
    numbered = sorted(p for p in run.checkpoints.iterdir() if STEP_CHECKPOINT.match(p.name))
    for old in numbered[: max(0, len(numbered) - keep_last)]:
        old.unlink()
    return path
