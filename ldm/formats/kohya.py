"""LoRA files in the kohya/webui layout: `<name>.lora_down.weight`, `<name>.lora_up.weight` and
`<name>.alpha` per adapted layer, in a .safetensors with `ss_*` metadata, as kohya-ss/sd-scripts
writes them and AUTOMATIC1111's webui, ComfyUI and diffusers' `load_lora_weights` read them.

`<name>` is `lora_unet_` or `lora_te_` and the module's path with `_` for `.`. For SD v1/v2,
kohya trains on diffusers-named modules, so the path is the diffusers one
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`) and the text encoder's
is transformers' (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`, for SD v2 too); files
from tools that name the UNet by its CompVis path (`lora_unet_input_blocks_1_1_...`, as kohya
does for SDXL) are read as well. Names come from the one name table (ldm/formats/layout.py).
"""

import json
import os
from collections.abc import Mapping

import torch

from ldm.checkpoint import CheckpointError, read_checkpoint, save_safetensors
from ldm.formats.diffusers_config import structure_of_config
from ldm.formats.layout import TEXT, UNET, UNET_PREFIX, Layout
from ldm.modules.lora import SUFFIXES, Adapter, merge

PREFIXES = {UNET: "lora_unet_", TEXT: "lora_te_"}


def _name(prefix: str, path: str) -> str:
    return prefix + path.removesuffix(".weight").replace(".", "_")


def lora_names(layout: Layout, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple]:
    """kohya name -> (SD weight key, rows) of every UNet and text-encoder matrix in `shapes`
    (SD key -> shape); both the diffusers-path and, for the UNet, the CompVis-path names."""
    names = {}
    for key, shape in shapes.items():
        if len(shape) < 2:
            continue  # LoRA adapts matrices and convolutions, not norms or biases
        for t in layout.to_diffusers(key) or ():
            if t.component in PREFIXES and t.key.endswith(".weight"):
                rows = (t.part, t.parts) if t.kind == "rows" else None
                names[_name(PREFIXES[t.component], t.key)] = (key, rows)
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            names[_name(PREFIXES[UNET], key[len(UNET_PREFIX) :])] = (key, None)
    return names


def _sample(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(sorted(items)[:n]) + more


def read_lora(
    path: str | os.PathLike, layout: Layout, shapes: Mapping[str, tuple[int, ...]]
) -> list[Adapter]:
    """The adapters of a kohya-layout file, checked against the model (`shapes`: SD key ->
    shape). Any key that is not a LoRA weight of this model is an error naming it."""
    source, _ = read_checkpoint(path)
    names = lora_names(layout, shapes)
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in source:
        name, _, suffix = key.partition(".")
        if suffix in SUFFIXES and name in names:
            groups.setdefault(name, {})[suffix] = key
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} keys are not kohya-layout LoRA weights of this model "
            f"({_sample(unknown)})"
        )
    adapters = []
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise CheckpointError(f"{path}: {name} needs both lora_down and lora_up weights")
        down, up = source[parts["lora_down.weight"]], source[parts["lora_up.weight"]]
        key, rows = names[name]
        # Files without alpha (the first LoRA files) mean alpha = rank: no scaling.
        alpha = float(source[parts["alpha"]]) if "alpha" in parts else float(down.shape[0])
        adapter = Adapter(key, down, up, alpha, rows)
        _check_shape(path, name, adapter, shapes[key])
        adapters.append(adapter)
    return adapters


def _check_shape(path, name: str, a: Adapter, shape: tuple[int, ...]) -> None:
    out = shape[0] // (a.rows[1] if a.rows else 1)
    numel = torch.Size((out, *shape[1:])).numel()
    made = a.up.shape[0] * torch.Size(a.down.shape[1:]).numel()
    if a.up.shape[1] != a.down.shape[0] or a.up.shape[0] != out or made != numel:
        raise CheckpointError(
            f"{path}: {name}: down {tuple(a.down.shape)} and up {tuple(a.up.shape)} do not fit "
            f"the model's weight {tuple(shape)}"
        )


def kohya_state(
    adapters: list[Adapter], layout: Layout, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Adapters as the tensors of a kohya-layout file (diffusers-path names, as kohya writes
    for SD v1/v2)."""
    state = {}
    for a in adapters:
        targets = layout.to_diffusers(a.key)
        if not targets or targets[0].component not in PREFIXES:
            raise CheckpointError(f"{a.key}: not a UNet or text-encoder weight; no kohya name")
        t = targets[a.rows[0] if a.rows else 0]
        name = _name(PREFIXES[t.component], t.key)
        down, up = (w.to(dtype or w.dtype).contiguous() for w in (a.down, a.up))
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(a.alpha, dtype=down.dtype)
    return state


def save_lora(
    adapters: list[Adapter],
    layout: Layout,
    path: str | os.PathLike,
    metadata: Mapping[str, object],
    dtype: torch.dtype | None = None,
) -> None:
    """Write a kohya-layout .safetensors (atomically); metadata values are stored as strings,
    JSON for containers."""
    strings = {
        k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        for k, v in metadata.items()
        if v is not None
    }
    save_safetensors(kohya_state(adapters, layout, dtype), path, {"format": "pt", **strings})


def _architecture(model_config: Mapping) -> tuple[str, str, bool, bool]:
    """(ss_base_model_version, modelspec.architecture, v2, v-prediction), as kohya names them."""
    params = model_config["params"]
    v2 = params["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
    v_pred = params.get("parameterization", "eps") == "v"
    version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else "")
    arch = "stable-diffusion-v1"
    if v2:
        arch = "stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"
    return version, f"{arch}/lora", v2, v_pred


def training_metadata(
    cfg: Mapping, adapters: list[Adapter], title: str, image_counts: tuple[int, int]
) -> dict[str, object]:
    """The ss_* and modelspec.* fields kohya writes, from a run's resolved config: base model,
    rank and alpha, and the identifier and class (as kohya's DreamBooth `class_tokens`)."""
    train, data = cfg["train"], cfg["data"]
    version, arch, v2, v_pred = _architecture(cfg["model"])
    subject = " ".join(w for w in (data["token"], data["class_word"]) if w)
    instances, regs = image_counts
    unet = any(a.key.startswith(UNET_PREFIX) for a in adapters)
    text = any(not a.key.startswith(UNET_PREFIX) for a in adapters)
    subsets = [{"class_tokens": subject, "is_reg": False, "img_count": instances, "num_repeats": 1}]
    if regs:
        subsets.append({"class_tokens": data["class_word"], "is_reg": True, "img_count": regs})
    size = data["size"]
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": max(a.rank for a in adapters),
        "ss_network_alpha": max(a.alpha for a in adapters),
        "ss_network_dropout": train["lora"]["dropout"],
        "ss_base_model_version": version,
        "ss_v2": v2,
        "ss_sd_model_name": os.path.basename(str(train["actual_resume"] or "")) or None,
        "ss_output_name": title,
        "ss_learning_rate": train["lr"],
        "ss_unet_lr": train["lr"] if unet else None,
        "ss_text_encoder_lr": train["lr"] if text else None,
        "ss_max_train_steps": train["max_steps"],
        "ss_resolution": f"({size}, {size})",
        "ss_seed": train["seed"],
        "ss_prior_loss_weight": train["prior_loss_weight"],
        "ss_num_train_images": instances,
        "ss_num_reg_images": regs,
        "ss_datasets": [{"is_dreambooth": True, "resolution": [size, size], "subsets": subsets}],
        "ss_dataset_dirs": {subject: {"n_repeats": 1, "img_count": instances}},
        "ss_tag_frequency": {subject: {subject: instances}},
        "ss_training_comment": f"DreamBooth LoRA; identifier {data['token']!r}, class "
        f"{data['class_word']!r}; prompt {data['instance_template']!r}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "diffusers",  # kohya's value for SD v1/v2 LoRA (module names)
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.trigger_phrase": subject,
    }


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`file.safetensors[:weight]` -> (file, weight); the weight defaults to 1."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a colon inside the path (C:\\...)
    return spec, 1.0


def apply_lora_files(
    weights: Mapping[str, torch.Tensor], model_config: Mapping, specs: list[str]
) -> None:
    """Merge each `file[:weight]` into `weights` (SD key -> tensor, changed in place), in order."""
    if not specs:
        return
    layout = Layout(structure_of_config(model_config))
    shapes = {key: tuple(value.shape) for key, value in weights.items()}
    for spec in specs:
        path, multiplier = parse_lora_spec(spec)
        merge(weights, read_lora(path, layout, shapes), multiplier)
