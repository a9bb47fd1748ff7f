"""LoRA training through peft: adapters injected into the UNet's (and the CLIP text encoder's)
linear layers, everything else frozen (by ldm/train/trainable.py), and the checkpoint in the SD
layout.

A LoRA run's checkpoint `state_dict` holds the merged weights W + (alpha / rank) * up @ down, so
txt2img and every SD tool load it as the fine-tuned model. Beside it, `lora` holds what resuming
needs bitwise: the adapters (`<SD module>.lora_down.weight`, `.lora_up.weight`, `.alpha`), the
adapted layers' original weights (merging is not exactly invertible; lean files store them as
they store the model, in fp16 by default), the adapters' EMA (there is no `model_ema.*`: an EMA
of adapters has no place in the SD layout) and the UNet LitEma's state.
"""

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ldm.checkpoint import CheckpointError, half_precision
from ldm.modules.ema import LitEma
from ldm.modules.lora import Adapter, adapter_state, adapters_of_state, merge

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

ADAPTER = "default"  # peft's name for a model's one adapter


def add_adapters(
    module: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    seed: int,
    unused: list[nn.Parameter] = (),
) -> list[nn.Parameter]:
    """Wrap the layers of `module` named `targets` (e.g. to_q, or to_out.0) with LoRA, except
    layers holding `unused` parameters (the conditioning never reaches them: their adapters
    would get no gradient, which DDP waits for); returns the adapter parameters. Initialised as
    diffusers does (down ~ N(0, std 1/rank), up = 0, so the model starts unchanged), from `seed`,
    so every process and every run start alike."""
    skip = {id(p) for p in unused}
    names = [
        name
        for name, layer in module.named_modules()
        if any(name == t or name.endswith(f".{t}") for t in targets)
        and not any(id(p) in skip for p in layer.parameters())
    ]
    from peft import LoraConfig, inject_adapter_in_model  # only LoRA runs pay its import (seconds)

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,  # whole names: peft matches them exactly
        init_lora_weights="gaussian",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module)
    return [p for n, p in module.named_parameters() if ".lora_" in n]


def lora_layers(model: nn.Module) -> "dict[str, LoraLayer]":
    """SD module path (e.g. model.diffusion_model.<...>.attn1.to_q) -> its LoRA layer."""
    if "peft" not in sys.modules:
        return {}  # no adapter exists before peft is imported
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _weights(layer: "LoraLayer") -> tuple[nn.Parameter, nn.Parameter]:
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def live_adapters(
    model: nn.Module, values: Mapping[str, torch.Tensor] | None = None
) -> list[Adapter]:
    """The model's adapters as float32 CPU copies; with `values` (parameter name -> tensor, e.g.
    an EMA's), those values instead of the live ones."""
    adapters = []
    for name, layer in lora_layers(model).items():
        down, up = _weights(layer)
        if values is not None:
            down = values[f"{name}.lora_A.{ADAPTER}.weight"]
            up = values[f"{name}.lora_B.{ADAPTER}.weight"]
        copy = [w.detach().float().cpu().clone() for w in (down, up)]
        adapters.append(Adapter(f"{name}.weight", *copy, float(layer.lora_alpha[ADAPTER])))
    return adapters


@torch.no_grad()
def load_adapters(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Put saved adapters (`adapter_state` layout) back into the model's LoRA layers, strictly."""
    saved = {a.key.removesuffix(".weight"): a for a in adapters_of_state(state)}
    layers = lora_layers(model)
    if set(saved) != set(layers):
        diff = sorted(set(saved) ^ set(layers))
        raise CheckpointError(f"{path}: its adapters are not those of the config ({diff[:3]})")
    for name, layer in layers.items():
        down, up = _weights(layer)
        if saved[name].down.shape != down.shape:
            raise CheckpointError(
                f"{path}: its adapters are of rank {saved[name].rank}, the config's "
                f"(train.lora.rank) {down.shape[0]}"
            )
        down.copy_(saved[name].down)
        up.copy_(saved[name].up)


def _ema_values(ema: LitEma | None, prefix: str) -> dict[str, torch.Tensor]:
    """An EMA's averages under the model's parameter names (`prefix` + the name inside)."""
    if ema is None:
        return {}
    buffers = dict(ema.named_buffers())
    return {f"{prefix}{name}": buffers[s] for name, s in ema.m_name2s_name.items()}


def is_peft_key(key: str) -> bool:
    """A state-dict entry peft's layers add (`...to_q.base_layer.weight`, `...to_q.lora_A...`):
    no CompVis module name has these parts."""
    return ".base_layer." in key or ".lora_A." in key or ".lora_B." in key


def adapter_entry(model: nn.Module, ema: LitEma | None, text_ema: LitEma | None) -> dict | None:
    """A LoRA run's checkpoint entry (host copies; `base` is added by `fold`): the adapters and
    their EMA as `adapter_state` tensors, and the UNet LitEma's state to resume from. None
    without adapters."""
    if not lora_layers(model):
        return None
    averages = {**_ema_values(ema, "model."), **_ema_values(text_ema, "cond_stage_model.")}
    unet_ema = None
    if ema is not None:  # LitEma's own buffers (decay, num_updates, shadows), to resume
        unet_ema = {k: v.detach().to("cpu", copy=True) for k, v in ema.state_dict().items()}
    return {
        "adapters": adapter_state(live_adapters(model)),
        "ema": adapter_state(live_adapters(model, averages)) if averages else None,
        "unet_ema": unet_ema,
    }


def fold(state: dict[str, torch.Tensor], entry: dict | None) -> dict | None:
    """Turn a LoRA model's state dict into the SD layout, in place: peft's entries out, and each
    adapted weight (there as loaded, from the frozen weights) replaced by W + (alpha / rank) *
    up @ down. Returns `entry` with the original weights as `base` (None without adapters)."""
    for key in [k for k in state if is_peft_key(k)]:
        del state[key]
    if entry is None:
        return None
    adapters = adapters_of_state(entry["adapters"])
    base = {a.key: state[a.key] for a in adapters}
    merged = {key: weight.clone() for key, weight in base.items()}  # the originals stay as loaded
    merge(merged, adapters)
    state.update(merged)
    return {**entry, "base": base}


def with_lora(payload: dict, entry: dict | None, half: bool = False) -> dict:
    """A checkpoint payload with a LoRA run's entry; `half` stores its original weights as a
    lean checkpoint stores the model (the adapters stay float32: they are the export's source)."""
    if entry is None:
        return payload
    if half:
        entry = {**entry, "base": {k: half_precision(k, v) for k, v in entry["base"].items()}}
    return {**payload, "lora": entry}


def resumed_weights(source: Mapping, extras: Mapping) -> Mapping:
    """The weights to rebuild a run's model from: a LoRA run's base weights, not its merged ones."""
    lora = extras.get("lora")
    return source if lora is None else {**source, **lora["base"]}
