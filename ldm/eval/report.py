"""The paper's numbers (Ruiz et al. 2023, see shared/REFERENCE.md) and markdown tables that put a
user's results beside them. Metric values are floats; None or NaN print as "–"."""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ldm.checkpoint import save_text

METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
HEADERS = {
    "dino": "DINO ↑",
    "clip_i": "CLIP-I ↑",
    "clip_t": "CLIP-T ↑",
    "pres": "PRES ↓",
    "div": "DIV ↑",
}

# Table 1 (Stable Diffusion rows and the real-images reference), averaged over the 30 subjects.
PAPER_TABLE1 = {
    "DreamBooth (Stable Diffusion), paper": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "Textual Inversion (Stable Diffusion), paper": {
        "dino": 0.569,
        "clip_i": 0.780,
        "clip_t": 0.255,
    },
    "Real images, paper": {"dino": 0.774, "clip_i": 0.885},
}
# Table 3, prior preservation (Imagen).
PAPER_TABLE3 = {
    "with prior preservation, paper (Imagen)": {
        "pres": 0.493, "div": 0.391, "dino": 0.684, "clip_i": 0.815, "clip_t": 0.308,
    },
    "without prior preservation, paper (Imagen)": {
        "pres": 0.664, "div": 0.371, "dino": 0.712, "clip_i": 0.828, "clip_t": 0.306,
    },
}  # fmt: skip
# Table 4, class noun (Imagen).
PAPER_TABLE4 = {
    "correct class noun, paper (Imagen)": {"dino": 0.744, "clip_i": 0.853},
    "no class noun, paper (Imagen)": {"dino": 0.303, "clip_i": 0.607},
    "wrong class noun, paper (Imagen)": {"dino": 0.454, "clip_i": 0.728},
}


def format_value(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float | None]]], metrics: Sequence[str] = METRICS
) -> str:
    """A markdown table: one row per (label, {metric: value}), one column per metric."""
    lines = [
        "| | " + " | ".join(HEADERS[m] for m in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for label, values in rows:
        cells = [format_value(values.get(m)) for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_safe(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """NaN (e.g. PRES without class images) as null: NaN is not JSON."""
    return {k: None if v is None or math.isnan(v) else v for k, v in metrics.items()}


def from_json(metrics: Mapping[str, float | None]) -> dict[str, float]:
    return {k: math.nan if v is None else float(v) for k, v in metrics.items()}


def write_report(outdir: str | Path, report: Mapping, markdown: str, name: str = "report") -> None:
    """`name.json` and `name.md` in `outdir`, each written whole and renamed into place (so a
    link planted in a shared folder is replaced, never written through)."""
    outdir = Path(outdir)
    save_text(json.dumps(report, indent=2, allow_nan=False) + "\n", outdir / f"{name}.json")
    save_text(markdown + "\n", outdir / f"{name}.md")
