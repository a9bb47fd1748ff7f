"""Peak memory and time of loading a full-size Stable Diffusion checkpoint.

    python scripts/bench_load.py [--config configs/stable-diffusion/v1-inference.yaml]
                                 [--workdir DIR] [--keep]

Writes checkpoints with random weights in the real layout (fp32 `.ckpt`, fp16 `.safetensors`,
full-EMA fp32 `.ckpt`; 2-8 GB each), then loads each case in a fresh Python process, so the
process's peak is the load's. Peak extra RSS is VmHWM minus the RSS right after the imports
(with the high-water mark reset there), taken after reading every weight once: memory-mapped
weights only become resident when touched, and a model is loaded to be used. The naive case is
CompVis's loader (`torch.load` without mmap, a normally initialised model, `load_state_dict`).
Prints one markdown table row per case and the machine.
"""

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ldm.checkpoint import (
    EMA_PREFIX,
    IGNORED_KEYS,
    ema_key,
    empty_parameters,
    load_model_from_config,
    save_checkpoint,
    save_safetensors,
)
from ldm.config_files import read_config_file
from ldm.util import instantiate_from_config

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
FILES = ("fp32.ckpt", "fp16.safetensors", "full-ema.ckpt")
# case -> (table label, file, how it is loaded)
CASES = {
    "fp32": ("fp32 .ckpt", "fp32.ckpt", "lean"),
    "ema": ("fp32 full-EMA .ckpt, use_ema", "full-ema.ckpt", "lean-ema"),
    "fp16": ("fp16 .safetensors into fp32", "fp16.safetensors", "lean"),
    "naive": ("naive (CompVis): torch.load + load_state_dict", "fp32.ckpt", "naive"),
}
MODES = ("lean", "lean-ema", "naive")


def random_state_dict(config: DictConfig) -> dict[str, torch.Tensor]:
    """The model's state dict with N(0, 0.02) weights, built on the meta device so no memory or
    time goes into the real initialisation; plus the position_ids that real v1 files carry."""
    with empty_parameters():
        model = instantiate_from_config(config.model)
    state = {}
    for key, value in model.state_dict().items():
        state[key] = torch.empty(value.shape).normal_(0, 0.02) if value.is_meta else value.clone()
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        state[POSITION_IDS] = torch.arange(77)[None]
    return state


def write_checkpoints(config: DictConfig, workdir: Path) -> None:
    """fp32.ckpt, fp16.safetensors and full-ema.ckpt in workdir; files already there are kept."""
    paths = {name: workdir / name for name in FILES}
    if all(p.is_file() for p in paths.values()):
        return
    print(f"writing checkpoints with random weights to {workdir}", file=sys.stderr)
    state = random_state_dict(config)
    save_checkpoint({"state_dict": state, "global_step": 0}, paths["fp32.ckpt"])
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors(half, paths["fp16.safetensors"], metadata={"format": "pt"})
    del half
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state[ema_key(key)] = torch.empty(state[key].shape).normal_(0, 0.02)
    state[EMA_PREFIX + "decay"] = torch.tensor(0.9999)
    state[EMA_PREFIX + "num_updates"] = torch.tensor(1000, dtype=torch.int)
    save_checkpoint({"state_dict": state, "global_step": 0}, paths["full-ema.ckpt"])


def proc_status_kb(*fields: str) -> list[int]:
    """Fields of /proc/self/status (VmRSS, VmHWM, RssFile, ...) in kB."""
    values = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return [int(values[f].split()[0]) for f in fields]


def naive_load(config: DictConfig, path: Path) -> torch.nn.Module:
    """CompVis's load_model_from_config: the whole file in memory, then a second copy in a
    normally built model."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = instantiate_from_config(config.model)
    model.load_state_dict({k: v for k, v in state.items() if k not in IGNORED_KEYS}, strict=False)
    return model


def measure(mode: str, config_path: str, path: Path) -> dict:
    """Run in the child process: load, touch every weight, report memory and time."""
    config = read_config_file(config_path)
    # Building once on the meta device does the lazy imports and reads the tokenizer files, which
    # would otherwise count as load time and memory (~0.4 GB, ~7 s) though they are no weights.
    with empty_parameters():
        instantiate_from_config(config.model)
    gc.collect()
    try:  # reset VmHWM to the current RSS (Linux >= 4.0), so the imports' peak does not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # an older kernel: the peak is then at least the imports' own
    rss0, file0 = proc_status_kb("VmRSS", "RssFile")
    start = time.perf_counter()
    if mode == "naive":
        model = naive_load(config, path)
    else:
        model = load_model_from_config(config, path, use_ema=mode == "lean-ema")
    loaded = time.perf_counter()
    tensors = list(model.parameters()) + list(model.buffers())
    with torch.no_grad():
        for tensor in tensors:  # page in memory-mapped weights, as a first forward would
            tensor.sum()
    touched = time.perf_counter()
    hwm, file1 = proc_status_kb("VmHWM", "RssFile")
    return {
        "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "peak_extra_bytes": (hwm - rss0) * 1024,
        "file_backed_bytes": (file1 - file0) * 1024,
        "load_s": loaded - start,
        "touch_s": touched - loaded,
    }


def run_case(mode: str, config_path: str, path: Path) -> dict:
    """`measure` in a fresh interpreter, so nothing from this process or earlier cases counts."""
    argv = [sys.executable, __file__, "--config", config_path, "--measure", mode, str(path)]
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB RAM, torch {torch.__version__}, "
        f"Python {platform.python_version()}, load average {load:.1f} at the end"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    p.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (reused next time)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--measure", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    if opt.measure:
        mode, path = opt.measure
        if mode not in MODES:
            raise SystemExit(f"--measure: mode must be one of {MODES}")
        print(json.dumps(measure(mode, opt.config, Path(path))))
        return
    workdir = opt.workdir or Path(tempfile.mkdtemp(prefix="bench_load_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        write_checkpoints(read_config_file(opt.config), workdir)
        print("| case | file size | model size | peak extra RSS | ratio | time |")
        print("|---|---|---|---|---|---|")
        for case in opt.cases:
            label, name, mode = CASES[case]
            path = workdir / name
            r = run_case(mode, opt.config, path)
            ratio = r["peak_extra_bytes"] / r["model_bytes"]
            mapped = (
                f" ({gb(r['file_backed_bytes'])} file-backed)"
                if r["file_backed_bytes"] > 0.01 * r["model_bytes"]
                else ""
            )
            times = f"{r['load_s']:.1f} s + {r['touch_s']:.1f} s first touch"
            row = [label, gb(path.stat().st_size), gb(r["model_bytes"])]
            row += [gb(r["peak_extra_bytes"]) + mapped, f"{ratio:.2f}x", times]
            print("| " + " | ".join(row) + " |", flush=True)
        print(f"\nMachine: {machine()}")
    finally:
        if not opt.keep:
            for name in FILES:
                (workdir / name).unlink(missing_ok=True)
            if not opt.workdir:
                workdir.rmdir()


if __name__ == "__main__":
    main()
