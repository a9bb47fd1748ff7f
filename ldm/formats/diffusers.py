"""diffusers model folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
of SD v1 and v2, read as a state dict in the SD layout and written from one.

Reading is lazy (one tensor at a time, through the same readers as checkpoint files), so a folder
loads into the `ldm` modules with the strict loader and its one-line errors. What diffusers does
not store is supplied from what it does: the schedule buffers from the scheduler config, and, for
SD v2, OpenCLIP's last text block, `text_projection` and `logit_scale` as zeros: SD v2 conditions
on the penultimate block, so nothing reads them (and writing a folder drops them again).
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, LazyTensors, read_checkpoint
from ldm.config_files import MAX_CONFIG_BYTES
from ldm.formats.diffusers_config import (
    BETA_SCHEDULES,
    DIFFUSERS_VERSION,
    diffusers_configs,
    mismatches,
    structure_of_config,
    structure_of_folder,
)
from ldm.formats.layout import (
    OPENCLIP_PREFIX,
    TEXT,
    UNET,
    VAE,
    Layout,
    to_diffusers_value,
    to_sd_value,
)
from ldm.models.diffusion.ddpm import schedule_buffers
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.encoders.tokenizer import END_TOKEN, START_TOKEN, clip_bpe

WEIGHT_NAMES = {
    UNET: "diffusion_pytorch_model",
    VAE: "diffusion_pytorch_model",
    TEXT: "model",
}
CONFIG_FILES = {
    UNET: "unet/config.json",
    VAE: "vae/config.json",
    TEXT: "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
# Stored by older transformers; a constant arange (as checkpoint.IGNORED_KEYS).
_IGNORED = frozenset({"text_model.embeddings.position_ids"})
_SCHEDULES = {d: c for c, d in BETA_SCHEDULES.items()}


def _json(path: Path) -> dict:
    # A folder may come from anyone: bounded like every config read from a file.
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; refused")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a diffusers SD model folder?)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read ({' '.join(str(e).split())})") from None


def _weights_file(folder: Path, component: str) -> Path:
    """A component's weights: safetensors before pickles, full precision before fp16."""
    name = WEIGHT_NAMES[component]
    names = [f"{name}.safetensors", f"{name}.fp16.safetensors", f"{name}.bin", f"{name}.fp16.bin"]
    if component == TEXT:
        names += ["pytorch_model.bin", "pytorch_model.fp16.bin"]
    for candidate in names:
        if (folder / component / candidate).is_file():
            return folder / component / candidate
    if any((folder / component).glob("*.index.json")):
        raise CheckpointError(f"{folder / component}: sharded weights are not supported")
    raise CheckpointError(f"{folder / component}: no weights ({names[0]} or {names[2]})")


def _text_key(key: str) -> str:
    """transformers 5 saves CLIPTextModel without its `text_model.` level; every SD folder has it."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


class DiffusersFolder(LazyTensors):
    """A diffusers SD v1/v2 folder as a lazy state dict in the SD checkpoint layout. Tensors the
    table has no place for appear as `component/key`, so the strict loader names them."""

    def __init__(self, path: str | os.PathLike, unsafe_load: bool = False):
        self.path = Path(path)
        _json(self.path / "model_index.json")
        self.configs = {name: _json(self.path / file) for name, file in CONFIG_FILES.items()}
        self.layout = Layout(structure_of_folder(self.configs))
        self.files = {}
        names: dict[str, dict[str, str]] = {}  # component -> folder key -> key in its file
        for component in (UNET, VAE, TEXT):
            self.files[component] = read_checkpoint(
                _weights_file(self.path, component), unsafe_load
            )[0]
            fix = _text_key if component == TEXT else str
            names[component] = {fix(k): k for k in self.files[component] if fix(k) not in _IGNORED}
        self._names = names
        self._sources: dict[str, tuple] = {}  # SD key -> (kind, [(component, file key), ...])
        parts: dict[str, dict[int, tuple[str, str]]] = {}
        for component, keys in names.items():
            for key, file_key in keys.items():
                target = self.layout.to_sd(component, key)
                if target is None:
                    self._sources[f"{component}/{key}"] = ("same", [(component, file_key)])
                    continue
                parts.setdefault(target.key, {})[target.part] = (component, file_key)
                if len(parts[target.key]) == target.parts:
                    ordered = [parts[target.key][i] for i in range(target.parts)]
                    self._sources[target.key] = (target.kind, ordered)
        self._values = {**self._schedule(), **self._unstored_text()}

    def _schedule(self) -> dict[str, torch.Tensor]:
        sc = self.configs["scheduler"]
        schedule = sc.get("beta_schedule", "linear")
        if sc.get("trained_betas") is not None or schedule not in _SCHEDULES:
            raise CheckpointError(
                f"{self.path}: scheduler beta_schedule {schedule!r} is not supported "
                f"(SD uses scaled_linear)"
            )
        betas = make_beta_schedule(
            _SCHEDULES[schedule],
            sc.get("num_train_timesteps", 1000),
            sc.get("beta_start", 0.0001),
            sc.get("beta_end", 0.02),
        )
        return schedule_buffers(np.asarray(betas))

    def _unstored_text(self) -> dict[str, torch.Tensor]:
        """SD v2's text tensors that diffusers leaves out, as zeros (nothing reads them)."""
        if self.layout.structure.text != "openclip":
            return {}
        tc = self.configs[TEXT]
        width, inner = tc["hidden_size"], tc["intermediate_size"]
        block = f"{OPENCLIP_PREFIX}transformer.resblocks.{tc['num_hidden_layers']}"
        shapes = {
            f"{OPENCLIP_PREFIX}text_projection": (width, width),  # embed_dim = width in ViT-H/14
            f"{OPENCLIP_PREFIX}logit_scale": (),
            f"{block}.attn.in_proj_weight": (3 * width, width),
            f"{block}.attn.in_proj_bias": (3 * width,),
            f"{block}.attn.out_proj.weight": (width, width),
            f"{block}.mlp.c_fc.weight": (inner, width),
            f"{block}.mlp.c_fc.bias": (inner,),
            f"{block}.mlp.c_proj.weight": (width, inner),
        }
        for name in ("attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            shapes[f"{block}.{name}"] = (width,)
        shapes[f"{block}.mlp.c_proj.bias"] = (width,)
        return {key: torch.zeros(shape) for key, shape in shapes.items()}

    def __iter__(self) -> Iterator[str]:
        yield from self._sources
        yield from self._values

    def __len__(self) -> int:
        return len(self._sources) + len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._sources or key in self._values

    def _part_shape(self, component: str, key: str) -> tuple[int, ...]:
        source = self.files[component]
        return source.shape(key) if isinstance(source, LazyTensors) else tuple(source[key].shape)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._values:
            return tuple(self._values[key].shape)
        kind, parts = self._sources[key]
        shapes = [self._part_shape(c, k) for c, k in parts]
        if kind == "conv1x1":
            return (*shapes[0], 1, 1)
        if kind == "rows":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return shapes[0]

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key in self._values:
            tensor = self._values[key]
        else:
            kind, parts = self._sources[key]
            tensor = to_sd_value([self.files[c][k] for c, k in parts], kind)
        return tensor if dtype is None else tensor.to(dtype)

    def check_model_config(self, model_config: Mapping) -> None:
        wrong = mismatches(self.configs, model_config)
        if wrong:
            more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
            raise CheckpointError(
                f"{self.path}: does not match the config: {'; '.join(wrong[:4])}{more}"
            )


def _unstored(key: str, layout: Layout) -> bool:
    """SD keys a diffusers folder has no place for, on purpose: schedule buffers (in the
    scheduler config), EMA copies, and SD v2's unused last text block and projection."""
    if "." not in key or key.startswith("model_ema."):
        return True
    if layout.structure.text == "openclip" and key.startswith(OPENCLIP_PREFIX):
        unused = f"{OPENCLIP_PREFIX}transformer.resblocks.{layout.structure.text_layers}."
        return key.startswith(unused) or key.endswith(("text_projection", "logit_scale"))
    return False


def diffusers_state(state: Mapping, model_config: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    """component -> diffusers state dict, from an SD-layout state dict."""
    layout = Layout(structure_of_config(model_config))
    out: dict[str, dict[str, torch.Tensor]] = {UNET: {}, VAE: {}, TEXT: {}}
    for key, tensor in state.items():
        targets = layout.to_diffusers(key)
        if targets is None:
            if not _unstored(key, layout):
                raise CheckpointError(f"{key}: has no place in the diffusers layout")
            continue
        for t in targets:
            out[t.component][t.key] = to_diffusers_value(tensor, t)
    return out


def _tokenizer_files(pad_token: str) -> dict[str, str]:
    """CLIP's tokenizer as the SD folders on the Hub store it (vocab.json and merges.txt, which
    every transformers version reads), from the BPE in open_clip's package."""
    vocab, merges = clip_bpe()
    special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN}
    special["pad_token"] = pad_token
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }


def _component_configs(model_config: Mapping, dtype: torch.dtype) -> dict[str, dict]:
    configs = diffusers_configs(model_config)
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    text = {
        **configs[TEXT],
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return {
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **version, **configs[UNET]},
        "vae/config.json": {"_class_name": "AutoencoderKL", **version, **configs[VAE]},
        "text_encoder/config.json": text,
        "scheduler/scheduler_config.json": {
            "_class_name": "DDIMScheduler",
            **version,
            **configs["scheduler"],
            # CompVis's DDIM: timesteps 1, 1 + T/S, ...; the last step's previous alpha is
            # alphas_cumprod[0]; no clipping of x0.
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "clip_sample": False,
        },
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            **version,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    }


def write_diffusers_folder(
    state: Mapping, model_config: Mapping, out: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write a folder that diffusers' StableDiffusionPipeline.from_pretrained loads offline. It
    is written beside `out` under a temporary name and renamed: `out` must not exist."""
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: exists; export into a new folder")
    components = diffusers_state(state, model_config)
    first = next(iter(components[UNET].values()))
    dtype = dtype or first.dtype
    configs = _component_configs(model_config, dtype)
    pad = "!" if structure_of_config(model_config).text == "openclip" else END_TOKEN
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for component, tensors in components.items():
            (tmp / component).mkdir()
            cast = {
                k: v.to(dtype).contiguous() if v.is_floating_point() else v
                for k, v in tensors.items()
            }
            save_file(
                cast, tmp / component / f"{WEIGHT_NAMES[component]}.safetensors", {"format": "pt"}
            )
        for name, config in configs.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "tokenizer").mkdir()
        for name, text in _tokenizer_files(pad).items():
            (tmp / "tokenizer" / name).write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
