"""Logs for people: a progress bar, TensorBoard scalars and image grids, and `metrics.csv` with
one row per optimizer step. Only rank 0 logs; the other ranks get a logger that does nothing."""

import csv
import io
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.checkpoint import save_text
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
    def __init__(self, root: Path | None, start_step: int, max_steps: int):
        self.enabled = root is not None
        self.pending: list[dict[str, torch.Tensor | float]] = []
        self.last_time, self.last_step = time.perf_counter(), start_step
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a resumed run rewrites, so curves do not double back.
        self.writer = SummaryWriter(root / "tensorboard", purge_step=start_step + 1)
        new_file = not (root / "metrics.csv").exists()
        if not new_file:
            _truncate_csv(root / "metrics.csv", start_step)
        self.csv_file = open_append(root / "metrics.csv", newline="")
        self.csv = csv.writer(self.csv_file)
        if new_file:
            self.csv.writerow(PER_STEP)
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
            for key in PER_STEP[1:]:
                if row.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", row[key], int(row["step"]))
        self.csv_file.flush()
        now = time.perf_counter()
        its = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        scalars = {"train/it_per_s": its, "train/peak_memory_gb": peak_memory_gb(device)}
        scalars.update(extra or {})
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        last = rows[-1]
        if self.bar is None:
            self.bar = tqdm(dynamic_ncols=True, **self.bar_args)
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", refresh=False)
        self.bar.update(step - self.bar.n)

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(key, value, step)

    def image(self, key: str, grid: torch.Tensor, step: int) -> None:
        if self.enabled:
            self.writer.add_image(key, grid, step)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.writer.close()
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
