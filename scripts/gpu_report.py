"""The jobs' records and the one table of scripts/gpu_check.py (its results, side by side)."""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import bench_train  # scripts/ is on sys.path: gpu_check.py puts it there

MARKER = "class images into"  # main.py's line when the class images are done
# Errors that mean "this machine lacks an optional package", shown as such rather than as failures.
ABSENT = {"diffusers is not installed": "no diffusers"}


@dataclass
class Job:
    key: tuple  # (section, name, "eager" | "captured" | "diffusers")
    script: str  # relative to the repository root
    argv: list[str]
    limit: float  # seconds
    priority: int


@dataclass
class Result:
    seconds: float = 0.0
    out: str = ""
    error: str | None = None  # one line, or None
    marks: dict = field(default_factory=dict)  # marker -> seconds after the start
    stderr: str = ""
    losses: list[float] = field(default_factory=list)  # a main.py run's, per step


def read_losses(result: Result) -> None:
    """A finished main.py run's per-step losses (metrics.csv), before its folder is removed."""
    run = next(line for line in result.out.splitlines() if line.startswith("run folder:"))
    with open(Path(run.split(":", 1)[1].strip()) / "metrics.csv", newline="") as f:
        result.losses = [float(row["loss"]) for row in csv.DictReader(f)]


def name(key: tuple) -> str:
    return " / ".join(filter(None, key))


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the last markdown table in `text`, as dicts keyed by its header."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set("".join(cells)) <= set("-"):
            continue
        if header is None or cells[0] in ("config", "device"):
            header, rows = cells, []
        else:
            rows.append(dict(zip(header, cells)))
    return rows


class Report:
    """The one table: a row per measurement, eager / captured / diffusers side by side."""

    def __init__(self, results: dict[tuple, Result]):
        self.results, self.notes = results, []

    def note(self, text: str) -> str:
        if text not in self.notes:
            self.notes.append(text)
        return f"[{self.notes.index(text) + 1}]"

    def failed(self, key: tuple) -> str | None:
        """The cell of a job that gave no numbers, or None."""
        result = self.results.get(key)
        if result is None:
            return "-"
        if result.error is None:
            return None
        for message, cell in ABSENT.items():
            if message in result.error:
                return cell
        if result.error.startswith(("skipped", "no checkpoint")):
            return result.error.split(":")[0]
        return f"failed {self.note(f'{name(key)}: {result.error}')}"

    def cell(self, key: tuple, read) -> str:
        """`read(result)` for a job that ran, else what became of it; output that does not
        parse is a note, not a crash that would lose the whole table."""
        if (cell := self.failed(key)) is not None:
            return cell
        try:
            return read(self.results[key])
        except (KeyError, IndexError, ValueError, StopIteration):
            tail = last_line(self.results[key].out)
            return f"unreadable {self.note(f'{name(key)}: {tail}')}"

    def train(self, label: str, mode: str) -> str:
        def read(result: Result) -> str:
            row = table_rows(result.out)[-1]
            cell = f"{float(row['s/step']):.3f} ({row['peak GiB']})"
            off = [p for p in row["switches"].split(", ") if p.startswith("capture off")]
            return cell + (f" eager {self.note(off[0])}" if off else "")

        return self.cell(("train", label, mode), read)

    def sample(self, batch: int, mode: str, sampler: str = "") -> str:
        def read(result: Result) -> str:
            row = next(r for r in table_rows(result.out) if r["batch"] == str(batch))
            s_per_image = float(row["s/image"])
            value = f"{s_per_image:.3f}" if batch == 1 else f"{1 / s_per_image:.2f}"
            return f"{value} ({row['peak GiB']})"

        return self.cell(("sample", sampler, mode), read)

    def e2e(self, mode: str) -> str:
        def read(result: Result) -> str:
            classes = result.marks.get(MARKER)
            return f"{result.seconds:.0f}" + (f" ({classes:.0f})" if classes is not None else "")

        return self.cell(("e2e", "", mode), read)

    def equality(self) -> str:
        """Largest relative difference of the captured run's per-step losses from the eager's."""
        if (cell := self.failed(("equal", "", "eager"))) is not None:
            return cell
        eager = self.results[("equal", "", "eager")].losses

        def read(result: Result) -> str:
            captured = result.losses
            if len(captured) != len(eager):
                raise ValueError(f"{len(captured)} steps against {len(eager)}")
            worst = max(abs(c - e) / max(abs(e), 1e-12) for c, e in zip(captured, eager))
            return f"{worst:.1e}"

        return self.cell(("equal", "", "captured"), read)

    def table(self, opt, s: dict) -> str:
        lines = ["| measurement | eager | captured | diffusers |", "|---|---|---|---|"]
        labels = dict.fromkeys(key[1] for key in self.results if key[0] == "train")
        for name, _ in bench_train.MATRIX:
            if name in labels:
                cells = [self.train(name, m) for m in ("eager", "captured", "diffusers")]
                lines.append(
                    f"| train s/step (peak GiB): {name}, {s['train_size']} px | {' | '.join(cells)} |"
                )
        for batch in [1, *opt.class_batch]:
            what = "sample s/image" if batch == 1 else "class images/s"
            cells = [self.sample(batch, m) for m in ("eager", "captured", "diffusers")]
            setting = f"batch {batch}, {s['ddim']} DDIM steps + guidance, {s['sample_size']} px"
            lines.append(f"| {what} (peak GiB): {setting} | {' | '.join(cells)} |")
        if any(key[:2] == ("sample", "dpmpp_2m") for key in self.results):
            for batch in opt.class_batch:
                cell = self.sample(batch, "captured", "dpmpp_2m")
                setting = f"batch {batch}, {s['solver']} DPM-Solver++ steps + guidance"
                setting += f", {s['sample_size']} px"
                lines.append(f"| class images/s (peak GiB): {setting} | - | {cell} | - |")
        cells = [self.e2e("eager"), self.e2e("captured"), "-"]
        lines.append(
            f"| time to trained subject, s (class images, s): {s['subject']} | {' | '.join(cells)} |"
        )
        lines.append(
            f"| captured vs eager: largest relative loss difference, {s['equal_steps']} steps "
            f"| - | {self.equality()} | - |"
        )
        notes = [f"[{i}] {text}" for i, text in enumerate(self.notes, 1)]
        return "\n".join(lines + notes)
