"""Config-driven construction (CompVis's instantiate_from_config) and small helpers.

A config is data, even when it names classes: it may come with a checkpoint or a .safetensors file
from someone else, and `instantiate_from_config` imports and calls whatever `target` names. So
only this package's model classes (`ldm.*` nn.Module subclasses) and the few torch modules Stable
Diffusion configs use are built, unless the caller allows any target (`--unsafe_load`).
"""

import contextvars
import hashlib
import importlib
import inspect
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ldm.data.images import DataError


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line."""


# Torch classes that CompVis and Stability configs name (the VAE's unused `lossconfig`).
TORCH_TARGETS = frozenset({"torch.nn.Identity"})
_PACKAGE_TARGET = re.compile(r"ldm(\.[A-Za-z_][A-Za-z0-9_]*)+")
# Set while an `unsafe` instantiate_from_config runs, so the nested configs it builds (UNet, VAE,
# text encoder inside LatentDiffusion) get the same permission.
_ANY_TARGET = contextvars.ContextVar("any_config_target", default=False)


def _refuse(target: object, why: str) -> ConfigError:
    return ConfigError(
        f"config target {target!r} {why}: a config builds only this package's model classes "
        f"(ldm.*) and {', '.join(sorted(TORCH_TARGETS))}; pass --unsafe_load only if you "
        "trust the config to run code"
    )


def check_target(target: object, unsafe: bool = False) -> None:
    """Refuse, by name alone (nothing is imported), a target outside `ldm.*` and TORCH_TARGETS."""
    if unsafe or _ANY_TARGET.get():
        return
    if not isinstance(target, str) or not (
        target in TORCH_TARGETS or _PACKAGE_TARGET.fullmatch(target)
    ):
        raise _refuse(target, "is not allowed")


def check_targets(config: object, unsafe: bool = False) -> None:
    """`check_target` for every `target` in a config tree: a config from a file is refused
    before anything is built (or, by export, passed on). A shared part is checked once."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=False)
    stack, seen = [config], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Mapping):
            if "target" in node:
                check_target(node["target"], unsafe)
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def get_obj_from_str(string: str):
    """Import "package.module.Name" and return Name."""
    module, cls = string.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module, package=None), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config target {string!r} cannot be imported: {e}") from None


def _target_class(string: object):
    check_target(string)
    target = get_obj_from_str(string)
    if _ANY_TARGET.get() or string in TORCH_TARGETS:
        return target
    # An `ldm.*` name may still reach something imported into a module (`ldm.util.importlib`).
    if not (
        inspect.isclass(target)
        and issubclass(target, nn.Module)
        and target.__module__.startswith("ldm.")
    ):
        raise _refuse(string, "is not a model class of this package")
    return target


def instantiate_from_config(config: Mapping, unsafe: bool = False):
    """Build `target(**params)` from a {"target": ..., "params": {...}} mapping. Only this
    package's model classes and TORCH_TARGETS, here and in the configs the object builds,
    unless `unsafe` (ConfigError naming the target otherwise)."""
    if "target" not in config:
        raise ConfigError(f"expected key 'target' to instantiate, got keys {list(config)}")
    token = _ANY_TARGET.set(True) if unsafe else None
    try:
        check_targets(config)  # every target, nested ones too, before anything is built
        target = _target_class(config["target"])
        params = config.get("params", {}) or {}
        try:  # check the arguments first, so a config typo is not mistaken for a bug inside
            inspect.signature(target).bind(**params)
        except TypeError as e:
            raise ConfigError(f"config for {config['target']}: {e}") from None
        return target(**params)
    finally:
        if token is not None:
            _ANY_TARGET.reset(token)


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


def open_append(path: str | os.PathLike, newline: str | None = None) -> IO[str]:
    """Open a log file (metrics.csv, index.jsonl) to append text. Never through a symbolic link
    or into anything but a regular file: a run folder may be shared, and a link planted in place
    of the log would send the appends elsewhere. DataError (one line naming the file) if so."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK  # a FIFO must not block
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if Path(path).is_symlink():
            raise DataError(path, "is a symbolic link; refusing to write through it") from None
        raise DataError(path, f"cannot be opened for appending ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(path, "is not a regular file; refusing to append to it")
    return os.fdopen(fd, "a", newline=newline)


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
