"""Where a run's numbers go besides metrics.csv: TensorBoard, and Weights & Biases if asked.

`train.loggers` names the trackers of a run. Each gets the same things: the scalars of every
step, the sample grids, the resolved config as hyperparameters, and the run's summary (its final
metrics: step, training and validation loss, and the evaluation figures when scripts/evaluate.py
ran on the run). The summary is also kept in `RUN/summary.json`, which is what sweeps read.
Only rank 0 makes trackers (ldm.train.logger.RunLogger).

TensorBoard's HParams view compares runs by a session record, rewritten whole at each summary in
`RUN/tensorboard/hparams/` (the config's scalar leaves, and the summary's metrics as scalars).
W&B runs are named after the run folder; the W&B run id is kept in `RUN/wandb/run_id`, so a
resumed run (`main.py -r`) continues the same W&B run. `WANDB_MODE=offline` works without network.
"""

import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import save_text
from ldm.train.config import ConfigError, config_leaves

SUMMARY = "summary.json"
HPARAMS_FILE = "events.out.tfevents.hparams"  # one fixed name: each summary replaces it
WANDB_ID = "wandb/run_id"  # in the run folder
WANDB_HINT = 'pip install -e ".[wandb]" (or pip install wandb)'


class Tracker(Protocol):
    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def image(self, key: str, grid: torch.Tensor, step: int) -> None:
        """`grid`: [3, H, W] in [0, 1]."""

    def summary(self, metrics: Mapping[str, float], finished: bool) -> None:
        """The run's final metrics so far (and whether it reached train.max_steps)."""

    def close(self) -> None: ...


def read_summary(root: Path) -> dict[str, float | None]:
    path = Path(root) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


def update_summary(
    root: Path,
    metrics: Mapping[str, float],
    trackers: Sequence[Tracker],
    max_steps: float,
    drop: str | None = None,
) -> dict[str, float | None]:
    """Merge `metrics` into RUN/summary.json (without the old keys that start with `drop`) and
    hand the numbers to the trackers. A non-finite value is stored as null."""
    old = {k: v for k, v in read_summary(root).items() if drop is None or not k.startswith(drop)}
    new = {k: v if v is None or math.isfinite(v) else None for k, v in metrics.items()}
    summary = {**old, **new}
    save_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", Path(root) / SUMMARY)
    numbers = {k: v for k, v in summary.items() if v is not None}
    for tracker in trackers:
        tracker.summary(numbers, numbers.get("step", 0) >= max_steps)
    return summary


def open_trackers(root: Path, cfg: DictConfig | None, start_step: int) -> list[Tracker]:
    """The trackers `train.loggers` names, for a run (new or resumed at `start_step`); without
    a config, TensorBoard."""
    if cfg is None:
        return [TensorBoardTracker(Path(root), OmegaConf.create(), start_step)]
    makers = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    return [makers[name](Path(root), cfg, start_step) for name in cfg.train.loggers]


def summary_trackers(root: Path, cfg: DictConfig) -> list[Tracker]:
    """The trackers of an existing run, to add to its summary (scripts/evaluate.py): its
    TensorBoard session, and its W&B run if it has one (a note, not an error, without wandb)."""
    loggers = OmegaConf.select(cfg, "train.loggers", default=["tensorboard"])  # older runs
    trackers: list[Tracker] = []
    if "tensorboard" in loggers:
        trackers.append(TensorBoardTracker(root, cfg, 0))
    if "wandb" in loggers and (root / WANDB_ID).is_file():
        try:
            trackers.append(WandbTracker(root, cfg, 0))
        except ConfigError as e:
            print(f"note: {e}; the run's W&B summary is not updated", file=sys.stderr)
    return trackers


def record_evaluation(root: Path, cfg: DictConfig, figures: Mapping[str, float]) -> None:
    """The evaluation figures of a run's last.ckpt into its summary as `eval/<name>`, and into
    the run's trackers (TensorBoard's HParams session, its W&B run)."""
    trackers = summary_trackers(root, cfg)
    max_steps = OmegaConf.select(cfg, "train.max_steps", default=math.inf)
    try:
        update_summary(root, {f"eval/{k}": v for k, v in figures.items()}, trackers, max_steps)
    finally:
        for tracker in trackers:
            tracker.close()


def import_wandb():
    """The wandb module, or a one-line ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"train.loggers: wandb is not installed: {WANDB_HINT}") from None
    return wandb


def require(loggers) -> None:
    """Fail before any work when a named tracker's package is missing."""
    if "wandb" in loggers:
        import_wandb()


def hparams_of(cfg: DictConfig) -> dict[str, bool | int | float | str]:
    """The resolved config's scalar leaves by dotted key; lists of scalars (train.trainable,
    train.betas) as text, since they are what ablations vary. None values are left out
    (TensorBoard has no null)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config_leaves(cfg).items():
        if isinstance(value, list):
            if all(isinstance(v, (bool, int, float, str)) for v in value):
                flat[key] = "[" + ", ".join(str(v) for v in value) + "]"
        elif value is not None:
            flat[key] = value
    return flat


class TensorBoardTracker:
    """Scalars and grids in RUN/tensorboard/, the HParams session in RUN/tensorboard/hparams/."""

    def __init__(self, root: Path, cfg: DictConfig, start_step: int):
        self.folder = root / "tensorboard"
        self.start_step = start_step
        self.hparams = hparams_of(cfg)
        self.started = time.time()
        self._writer = None  # made at the first scalar: a summary-only use writes no event file

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a resumed run rewrites, so curves do not double back.
            self._writer = SummaryWriter(self.folder, purge_step=self.start_step + 1)
        return self._writer

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, key: str, grid: torch.Tensor, step: int) -> None:
        self.writer.add_image(key, grid, step)

    def summary(self, metrics: Mapping[str, float], finished: bool) -> None:
        write_hparams(self.folder / "hparams", self.hparams, metrics, finished, self.started)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def write_hparams(
    folder: Path, hparams: Mapping, metrics: Mapping[str, float], finished: bool, started: float
) -> None:
    """The HParams session of a run as one event file, replaced atomically: the session start
    (hyperparameters), the metrics as scalars at the summary's step, and a session end once the
    run finished. No experiment record: TensorBoard then takes the union of every run's
    hyperparameters and metrics, so runs with different keys still line up."""
    from google.protobuf.struct_pb2 import Value
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard.summary import scalar
    from torch.utils.tensorboard.writer import FileWriter

    def record(tag: str, **data) -> Summary:
        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
        meta = metadata.create_summary_metadata(content)
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    def value(v) -> Value:
        if isinstance(v, bool):
            return Value(bool_value=v)
        return Value(number_value=v) if isinstance(v, (int, float)) else Value(string_value=str(v))

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=started)
    for key, v in hparams.items():
        start.hparams[key].CopyFrom(value(v))
    step = int(metrics.get("step", 0))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent.parent / f".hparams-{time.time_ns()}"  # outside TensorBoard's tree
    try:
        writer = FileWriter(str(tmp))
        writer.add_summary(record(metadata.SESSION_START_INFO_TAG, session_start_info=start), step)
        for key, v in metrics.items():
            if key != "step":
                writer.add_summary(scalar(key, v), step)
        if finished:
            end = plugin_data_pb2.SessionEndInfo(
                status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time()
            )
            writer.add_summary(record(metadata.SESSION_END_INFO_TAG, session_end_info=end), step)
        writer.close()
        (written,) = tmp.iterdir()
        written.replace(folder / HPARAMS_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class WandbTracker:
    """A W&B run named after the run folder, its files in RUN/wandb/."""

    def __init__(self, root: Path, cfg: DictConfig, start_step: int):
        self.wandb = import_wandb()
        id_file = root / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        wc = cfg.train.wandb
        # A new run takes W&B's id: a sweep agent's (WANDB_RUN_ID), or a fresh one.
        self.run = self.wandb.init(
            project=wc.project,
            entity=wc.entity,
            group=wc.group,
            tags=list(wc.tags) or None,
            name=root.name,
            id=run_id,
            resume="allow",
            dir=str(root),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        if run_id is None:
            save_text(self.run.id + "\n", id_file)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, key: str, grid: torch.Tensor, step: int) -> None:
        pixels = (grid.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        self.run.log({key: self.wandb.Image(pixels)}, step=step)

    def summary(self, metrics: Mapping[str, float], finished: bool) -> None:
        # Evaluation figures the run's summary dropped (training replaced the evaluated
        # checkpoint) leave W&B's too.
        for key in [k for k in self.run.summary.keys() if k.startswith("eval/")]:
            if key not in metrics:
                del self.run.summary[key]
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        self.run.finish()
