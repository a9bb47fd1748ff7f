"""Logs for people: a progress bar, `metrics.csv` with one row per optimizer step, and the
trackers of `train.loggers` (TensorBoard, W&B: ldm.train.trackers) with the same scalars, the
sample grids, the config and the run's summary. Only rank 0 logs; the other ranks get a logger
that does nothing."""

import csv
import io
import math
import resource
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ldm.checkpoint import save_text
from ldm.train.trackers import open_trackers, update_summary
from ldm.util import open_append

PER_STEP = ("step", "loss", "loss_instance", "loss_prior", "lr", "grad_norm", "skipped")


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU, else the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's counters, or the RSS high-water mark (Linux >= 4.0)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then includes what came before


class RunLogger:
    def __init__(
        self, root: Path | None, start_step: int, max_steps: int, cfg: DictConfig | None = None
    ):
        """`cfg`: the run's config, for its trackers (without one: TensorBoard, no hparams)."""
        self.enabled = root is not None
        self.pending: list[dict[str, torch.Tensor | float]] = []
        self.last_time, self.last_step = time.perf_counter(), start_step
        if not self.enabled:
            return
        new_file = not (root / "metrics.csv").exists()
        if not new_file:
            _truncate_csv(root / "metrics.csv", start_step)
        self.csv_file = open_append(root / "metrics.csv", newline="")
        self.csv = csv.writer(self.csv_file)
        if new_file:
            self.csv.writerow(PER_STEP)
        self.root, self.max_steps = root, max_steps
        self.trackers = open_trackers(root, cfg, start_step)
        self.final: dict[str, float] = {}  # this session's part of the run's summary
        # A resumed run's summary with its new config; the evaluation figures are dropped, as
        # they describe a last.ckpt that this session replaces.
        drop = "eval/" if start_step < max_steps else None
        previous = update_summary(root, {}, self.trackers, max_steps, drop)
        best = previous.get("val/best_loss")
        self.best_val = math.inf if best is None else best
        self.bar_args = dict(total=max_steps, initial=start_step, desc="train", file=sys.stdout)
        self.bar = None  # made at the first flush, after set-up has printed what it prints

    def step(self, values: dict[str, torch.Tensor | float]) -> None:
        """Record one optimizer step; tensors stay on the device until `flush`."""
        if self.enabled:
            self.pending.append(values)

    def flush(self, step: int, device: torch.device, extra: dict[str, float] | None = None) -> None:
        """Write the pending steps (one host sync for all of them) and update the bar."""
        if not self.enabled or not self.pending:
            return
        rows = [
            {k: None if v is None else float(v) for k, v in values.items()}
            for values in _to_host(self.pending)
        ]
        self.pending = []
        for row in rows:
            self.csv.writerow([_fmt(row.get(k)) for k in PER_STEP])
            values = {f"train/{k}": row[k] for k in PER_STEP[1:] if row.get(k) is not None}
            self._scalars(values, int(row["step"]))
        self.csv_file.flush()
        now = time.perf_counter()
        its = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        scalars = {"train/it_per_s": its, "train/peak_memory_gb": peak_memory_gb(device)}
        scalars.update(extra or {})
        self._scalars(scalars, step)
        last = rows[-1]
        self.final.update({"step": step, "train/loss": last["loss"]})
        if self.bar is None:
            self.bar = tqdm(dynamic_ncols=True, **self.bar_args)
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", refresh=False)
        self.bar.update(step - self.bar.n)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.scalars(values, step)

    def scalar(self, key: str, value: float, step: int) -> None:
        if not self.enabled:
            return
        self._scalars({key: value}, step)
        if key == "val/loss":
            self.best_val = min(self.best_val, value)
            self.final.update({"val/loss": value, "val/best_loss": self.best_val})

    def image(self, key: str, grid: torch.Tensor, step: int) -> None:
        if self.enabled:
            for tracker in self.trackers:
                tracker.image(key, grid, step)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            if self.final:
                update_summary(self.root, self.final, self.trackers, self.max_steps)
            for tracker in self.trackers:
                tracker.close()
            self.csv_file.close()


def _truncate_csv(path: Path, step: int) -> None:
    """Drop the rows after `step`: a run resumed from an older checkpoint logs them again.
    Rewritten through a fresh temporary file (save_text); a planted link is left to
    open_append, which refuses it."""
    if path.is_symlink():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= step]
    if len(kept) < len(rows):
        text = io.StringIO(newline="")
        csv.writer(text).writerows(kept)
        save_text(text.getvalue(), path)


def _to_host(pending: list[dict]) -> list[dict]:
    tensors = [v for values in pending for v in values.values() if isinstance(v, torch.Tensor)]
    if tensors:
        host = torch.stack([t.detach().float().reshape(()) for t in tensors]).cpu().tolist()
        it = iter(host)
        return [
            {k: next(it) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            for values in pending
        ]
    return pending


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)
