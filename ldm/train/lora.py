"""LoRA training through peft: adapters injected into the UNet's (and the CLIP text encoder's)
linear layers, everything else frozen (by ldm/train/trainable.py), and the checkpoint in the SD
layout.

A LoRA run's checkpoint `state_dict` holds the merged weights W + (alpha / rank) * up @ down, so
txt2img and every SD tool load it as the fine-tuned model. Beside it, `lora` holds what resuming
needs bitwise: the adapters (`<SD module>.lora_down.weight`, `.lora_up.weight`, `.alpha`), the
adapted layers' original weights (merging is not exactly invertible), and the adapters' EMA
(there is no `model_ema.*`: an EMA of adapters has no place in the SD layout).
"""

from collections.abc import Mapping

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from ldm.checkpoint import CheckpointError
from ldm.modules.ema import LitEma
from ldm.modules.lora import Adapter, adapter_state, adapters_of_state, merge

ADAPTER = "default"  # peft's name for a model's one adapter


def add_adapters(
    module: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int
) -> list[nn.Parameter]:
    """Wrap the layers of `module` named `targets` (e.g. to_q, or to_out.0) with LoRA; returns
    the adapter parameters. Initialised as diffusers does (down ~ N(0, 1/rank), up = 0, so the
    model starts unchanged), from `seed`, so every process and every run start alike."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        init_lora_weights="gaussian",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module)
    return [p for n, p in module.named_parameters() if ".lora_" in n]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """SD module path (e.g. model.diffusion_model.<...>.attn1.to_q) -> its LoRA layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _weights(layer: LoraLayer) -> tuple[nn.Parameter, nn.Parameter]:
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
        down.copy_(saved[name].down)
        up.copy_(saved[name].up)


def _ema_values(ema: LitEma | None, prefix: str) -> dict[str, torch.Tensor]:
    """An EMA's averages under the model's parameter names (`prefix` + the name inside)."""
    if ema is None:
        return {}
    buffers = dict(ema.named_buffers())
    return {f"{prefix}{name}": buffers[s] for name, s in ema.m_name2s_name.items()}


def fold_into_checkpoint(
    state: dict[str, torch.Tensor], model: nn.Module, ema: LitEma | None, text_ema: LitEma | None
) -> dict | None:
    """Turn a LoRA model's state dict (which holds peft's `base_layer`/`lora_A`/`lora_B` entries
    and, from the frozen weights, the originals under their SD names) into the SD layout with
    merged weights, in place; return the checkpoint's `lora` entry (None without adapters)."""
    layers = lora_layers(model)
    if not layers:
        return None
    peft_parts = tuple(f"{name}.{part}" for name in layers for part in ("base_layer.", "lora_"))
    for key in [k for k in state if k.startswith(peft_parts)]:
        del state[key]
    adapters = live_adapters(model)
    base = {a.key: state[a.key] for a in adapters}
    merged = {key: weight.clone() for key, weight in base.items()}
    merge(merged, adapters)
    state.update(merged)
    averages = {**_ema_values(ema, "model."), **_ema_values(text_ema, "cond_stage_model.")}
    return {
        "adapters": adapter_state(adapters),
        "base": base,
        "ema": adapter_state(live_adapters(model, averages)) if averages else None,
        "unet_ema": ema.state_dict() if ema is not None else None,  # LitEma's, to resume
    }


def resumed_weights(source: Mapping, extras: Mapping) -> Mapping:
    """The weights to rebuild a run's model from: a LoRA run's base weights, not its merged ones."""
    lora = extras.get("lora")
    return source if lora is None else {**source, **lora["base"]}
