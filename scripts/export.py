"""Export a lean inference file from a training (or any SD-layout) checkpoint.

    python scripts/export.py --ckpt logs/<run>/checkpoints/last.ckpt --out mydog.safetensors \
        --half --use_ema

Keeps the model in the Stable Diffusion layout and nothing else (no optimizer, no EMA copies):
with --use_ema the UNet weights are the `model_ema.*` ones. --half stores fp16 (the schedule
buffers stay fp32). The run's config goes into the file: `config` in the .safetensors metadata
(YAML) or in the .ckpt dict. Loads with txt2img and other SD tools.
"""

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import (
    EMA_PREFIX,
    CheckpointError,
    ema_key,
    half_precision,
    read_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from ldm.config_files import config_from_data, read_config_file
from ldm.util import check_targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="the checkpoint to export")
    p.add_argument("--out", required=True, help="a .safetensors or .ckpt path")
    p.add_argument("--use_ema", action="store_true", help="the UNet's EMA weights")
    p.add_argument("--half", action="store_true", help="store fp16")
    p.add_argument("--config", default=None, help="config to embed (default: the checkpoint's)")
    p.add_argument(
        "--unsafe_load",
        action="store_true",
        help="trust the files: arbitrary unpickling, any config target",
    )
    return p.parse_args(argv)


def lean_state(source, use_ema: bool, half: bool, path) -> dict[str, torch.Tensor]:
    """The SD-layout weights to ship: EMA or not, without the `model_ema.*` entries."""
    keys = [k for k in source.keys() if not k.startswith(EMA_PREFIX)]
    if use_ema and not any(k.startswith(EMA_PREFIX) for k in source.keys()):
        raise CheckpointError(f"{path}: has no EMA weights (model_ema.*)")
    state = {}
    for key in keys:
        take_ema = use_ema and key.startswith("model.diffusion_model.")
        tensor = source[ema_key(key) if take_ema else key]
        state[key] = half_precision(key, tensor) if half else tensor
    return state


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source, extras = read_checkpoint(args.ckpt, unsafe_load=args.unsafe_load)
        if args.config:
            config = read_config_file(args.config)
        elif "config" in extras:
            config = config_from_data(extras["config"], f"{args.ckpt}: config")
        else:
            raise CheckpointError(f"{args.ckpt}: holds no config; pass --config")
        check_targets(config, args.unsafe_load)  # not passed on to whoever loads the export
        config = OmegaConf.to_container(config, resolve=True)
        state = lean_state(source, args.use_ema, args.half, args.ckpt)
        out = Path(args.out)
        if out.suffix == ".safetensors":
            metadata = {"format": "pt", "config": OmegaConf.to_yaml(OmegaConf.create(config))}
            save_safetensors(state, out, metadata=metadata)
        elif out.suffix == ".ckpt":
            save_checkpoint({"state_dict": state, "config": config}, out)
        else:
            raise ValueError(f"--out {out}: use a .safetensors or .ckpt name")
    except (ValueError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    size = out.stat().st_size / 2**20
    print(f"{out}: {len(state)} tensors, {size:.1f} MiB{' fp16' if args.half else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
