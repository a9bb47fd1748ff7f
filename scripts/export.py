"""Export a training (or any SD-layout) checkpoint: a lean SD file, a diffusers folder, or a LoRA
run's adapters as a kohya/webui LoRA file.

    python scripts/export.py --ckpt logs/<run>/checkpoints/last.ckpt --out mydog.safetensors \
        --half --use_ema
    python scripts/export.py --ckpt logs/<run>/checkpoints/last.ckpt --out mydog-diffusers \
        --format diffusers
    python scripts/export.py --ckpt logs/<lora run>/checkpoints/last.ckpt --out mydog-lora.safetensors \
        --format kohya
    python scripts/export.py --ckpt sd-v1-5.safetensors --config configs/stable-diffusion/v1-inference.yaml \
        --lora mydog-lora.safetensors:0.8 --out merged.safetensors

`sd` (the default) keeps the Stable Diffusion layout and nothing else (no optimizer, no EMA
copies): with --use_ema the UNet weights are the `model_ema.*` ones (for a LoRA run: the
adapters' EMA merged into the original weights). --half stores fp16 (the schedule buffers stay
fp32). The run's config goes into the file: `config` in the .safetensors metadata (YAML) or in
the .ckpt dict; a diffusers folder as --ckpt becomes a single SD file. `--lora file[:weight]`
(repeatable) merges LoRA files in the kohya layout into the weights first (sd and diffusers).
`diffusers` writes a folder that diffusers' StableDiffusionPipeline.from_pretrained loads
offline. `kohya` writes the adapters of a LoRA run (`train.trainable: [lora]`), with kohya's ss_*
metadata; --use_ema takes their EMA.
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
    load_model,
    read_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from ldm.config_files import config_from_data, read_config_file
from ldm.data.images import list_images
from ldm.formats.diffusers import DiffusersFolder, write_diffusers_folder
from ldm.formats.diffusers_config import structure_of_config
from ldm.formats.kohya import apply_lora_files, save_lora, training_metadata
from ldm.formats.layout import Layout
from ldm.modules.lora import adapters_of_state
from ldm.train.lora import fold
from ldm.util import check_targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="the checkpoint (or diffusers folder) to export")
    p.add_argument("--out", required=True, help="a .safetensors or .ckpt path, or a folder")
    p.add_argument("--format", choices=["sd", "diffusers", "kohya"], default="sd")
    p.add_argument("--use_ema", action="store_true", help="the EMA weights (of the adapters)")
    p.add_argument("--half", action="store_true", help="store fp16")
    p.add_argument("--config", default=None, help="config to embed (default: the checkpoint's)")
    p.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="merge a LoRA file"
    )
    p.add_argument(
        "--unsafe_load",
        action="store_true",
        help="trust the files: arbitrary unpickling, any config target",
    )
    return p.parse_args(argv)


def lean_state(source, use_ema: bool, path) -> dict[str, torch.Tensor]:
    """The SD-layout weights to ship: EMA or not, without the `model_ema.*` entries."""
    keys = [k for k in source.keys() if not k.startswith(EMA_PREFIX)]
    if use_ema and not any(k.startswith(EMA_PREFIX) for k in source.keys()):
        raise CheckpointError(f"{path}: has no EMA weights (model_ema.*)")
    state = {}
    for key in keys:
        take_ema = use_ema and key.startswith("model.diffusion_model.")
        state[key] = source[ema_key(key) if take_ema else key]
    return state


def weights(args, source, extras: dict, config: dict) -> dict[str, torch.Tensor]:
    """The SD-layout weights to export, with the LoRA files of --lora merged in."""
    lora = extras.get("lora")
    if args.use_ema and lora is not None:  # a LoRA run: the adapters' EMA on the originals
        if lora["ema"] is None:
            raise CheckpointError(f"{args.ckpt}: has no EMA of its adapters (train.ema.enabled)")
        state = {**lean_state(source, False, args.ckpt), **lora["base"]}
        fold(state, {"adapters": lora["ema"]})
    elif isinstance(source, DiffusersFolder) or args.format == "diffusers":
        # Through the model: converted and checked strictly against the config.
        model = load_model(config["model"], args.ckpt, args.use_ema, args.unsafe_load)[0]
        state = model.state_dict()
    else:
        state = lean_state(source, args.use_ema, args.ckpt)
    apply_lora_files(state, config["model"], args.lora)
    return state


def export_sd(state: dict, config: dict, out: Path, half: bool) -> None:
    if half:
        state = {k: half_precision(k, v) for k, v in state.items()}
    if out.suffix == ".safetensors":
        metadata = {"format": "pt", "config": OmegaConf.to_yaml(OmegaConf.create(config))}
        save_safetensors(state, out, metadata=metadata)
    elif out.suffix == ".ckpt":
        save_checkpoint({"state_dict": state, "config": config}, out)
    else:
        raise ValueError(f"--out {out}: use a .safetensors or .ckpt name")


def _count(folder) -> int:
    return len(list_images(folder)) if folder and Path(folder).is_dir() else 0


def export_kohya(args, extras: dict, config: dict, out: Path) -> int:
    lora = extras.get("lora")
    if lora is None:
        raise CheckpointError(f"{args.ckpt}: has no LoRA adapters (train.trainable: [lora])")
    if args.use_ema and lora["ema"] is None:
        raise CheckpointError(f"{args.ckpt}: has no EMA of its adapters (train.ema.enabled)")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a kohya LoRA file is a .safetensors")
    adapters = adapters_of_state(lora["ema"] if args.use_ema else lora["adapters"])
    data = config["data"]
    counts = (_count(data["instance_root"]), _count(data["class_root"]))
    metadata = training_metadata(config, adapters, out.stem, counts)
    layout = Layout(structure_of_config(config["model"]))
    save_lora(adapters, layout, out, metadata, torch.float16 if args.half else None)
    return 3 * len(adapters)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
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
        if args.format == "kohya":
            count = export_kohya(args, extras, config, out)
        else:
            state = weights(args, source, extras, config)
            count = len(state)
            if args.format == "diffusers":
                dtype = torch.float16 if args.half else None
                write_diffusers_folder(state, config["model"], out, dtype)
            else:
                export_sd(state, config, out, args.half)
    except ValueError as e:  # CheckpointError, FormatError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files) / 2**20
    print(f"{out}: {count} tensors, {size:.2f} MiB{' fp16' if args.half else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
