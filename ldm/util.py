"""Config-driven construction (CompVis's instantiate_from_config) and small helpers."""

import hashlib
import importlib
import inspect
from collections.abc import Mapping

import torch
import torch.nn as nn


def get_obj_from_str(string: str):
    """Import "package.module.Name" and return Name."""
    module, cls = string.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module, package=None), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config target {string!r} cannot be imported: {e}") from None


def instantiate_from_config(config: Mapping):
    """Build `target(**params)` from a {"target": ..., "params": {...}} mapping."""
    if "target" not in config:
        raise KeyError(f"expected key 'target' to instantiate, got keys {list(config)}")
    target = get_obj_from_str(config["target"])
    params = config.get("params", {}) or {}
    try:  # check the arguments first, so a config typo is not mistaken for a bug inside
        inspect.signature(target).bind(**params)
    except TypeError as e:
        raise ValueError(f"config for {config['target']}: {e}") from None
    return target(**params)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


PRECISIONS = {
    "32": None,
    "full": None,
    "16": torch.float16,
    "fp16": torch.float16,
    "autocast": torch.float16,
    "bf16": torch.bfloat16,
}


def precision_dtype(precision: str | int) -> torch.dtype | None:
    """The autocast dtype of a precision setting; None means full float32."""
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[key]


def default_precision(device: torch.device | str) -> str:
    """Sampling precision when none is asked for: fp16 autocast on CUDA, float32 elsewhere."""
    return "autocast" if torch.device(device).type == "cuda" else "full"


def autocast(device: torch.device | str, precision: str | int):
    """Mixed-precision context for `device`: autocast to fp16/bf16, or a no-op for "32"."""
    dtype = precision_dtype(precision)
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def keyed_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints and strings, stable across runs and machines."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def size_multiple(model_config: Mapping) -> int | None:
    """Image sides a LatentDiffusion config can take are multiples of this: the VAE halves each
    side per level after its first, then each UNet level after its first halves the latent again,
    and the UNet's skip connections need exact halves. None if the config lacks that structure."""
    try:
        params = model_config["params"]
        unet_levels = len(params["unet_config"]["params"]["channel_mult"])
        vae_levels = len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"])
    except (KeyError, TypeError, AttributeError):
        return None
    return 2 ** (vae_levels - 1) * 2 ** (unet_levels - 1)
