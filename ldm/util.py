"""Config-driven construction (CompVis's instantiate_from_config) and small helpers."""

import importlib
from collections.abc import Mapping

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
    return get_obj_from_str(config["target"])(**config.get("params", {}))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
