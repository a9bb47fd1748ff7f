"""Checkpoint I/O in the Stable Diffusion layout: strict, lean on memory, written atomically.

Reading never holds two full copies of the weights: the model is built with its parameters on the
meta device, `.ckpt` tensors are memory-mapped and become the parameters themselves, and
`.safetensors` tensors are read one at a time straight into the parameter dtype.
"""

import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ldm.checkpoint_rules import (  # CheckpointError is re-exported: import it from here
    SAFETENSORS_DTYPES,
    CheckpointError,
    check_tensors,
    check_torch_zip,
    read_safetensors_header,
)
from ldm.util import instantiate_from_config

# Keys that real checkpoints carry and current code does not store; dropped on load.
IGNORED_KEYS = frozenset(
    {
        # A constant arange(77); a non-persistent buffer since transformers 4.31.
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    }
)
EMA_PREFIX = "model_ema."


class SaveError(RuntimeError):
    """A file or folder that cannot be written (no space, no permission); one line naming it."""


class LazyTensors(Mapping):
    """A state dict whose tensors are read one at a time, in the SD layout (a .safetensors file,
    a diffusers folder): `shape` without reading, `read` into a dtype."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check_model_config(self, model_config: Mapping) -> None:
        """Raise CheckpointError when the source cannot be what `model_config` builds in ways
        its keys and shapes do not show (a diffusers folder's configs); plain files cannot tell."""


class SafetensorsFile(LazyTensors):
    """Lazy read access to a .safetensors file: the header is parsed and checked against the
    format's rules once (ldm.checkpoint_rules), and each tensor is read with plain file reads
    (no mmap, so nothing of the file stays resident)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self.metadata, self.data_start = read_safetensors_header(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            n = f.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
        if n != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading {key!r}")
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)


def _load_pickle(path: Path, unsafe_load: bool) -> dict:
    check_torch_zip(path)  # before torch.load inflates anything
    # torch.save's zip format memory-maps; the legacy format (torch < 1.6, old SD tools) cannot,
    # and is read into memory instead.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=not unsafe_load)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused: it needs arbitrary unpickling, which can run code ({reason}). "
            "Only if you trust the file, pass --unsafe_load"
        ) from None
    except (RuntimeError, EOFError, OSError, ModuleNotFoundError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read ({reason}); truncated or corrupt?") from None


def read_checkpoint(path: str | os.PathLike, unsafe_load: bool = False) -> tuple[Mapping, dict]:
    """(tensors, extras): the state dict as a lazy mapping, and everything else in the file
    (`global_step`, training state, ...; for .safetensors the string metadata). A folder is read
    as a diffusers model folder, in the SD layout."""
    path = Path(path)
    if path.is_dir():
        from ldm.formats.diffusers import DiffusersFolder  # it reads its files through this module

        return DiffusersFolder(path, unsafe_load=unsafe_load), {}
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        st = SafetensorsFile(path)
        return st, dict(st.metadata)
    obj = _load_pickle(path, unsafe_load)
    check_tensors(path, obj)  # here, so every reader (export.py included) is covered
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if "state_dict" in obj:
        extras = {k: v for k, v in obj.items() if k != "state_dict"}
        return obj["state_dict"], extras
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise CheckpointError(f"{path}: has no 'state_dict' (keys: {sorted(obj)[:8]})")


def ema_key(key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA_PREFIX + key[len("model.") :].replace(".", "")


def _family(keys) -> str | None:
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "SD v2 (OpenCLIP text encoder)"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "SD v1 (CLIP text encoder)"
    return None


def _sample(keys, n: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _source_keys(expected: Mapping, available: set[str], use_ema: bool, path) -> dict[str, str]:
    """Which checkpoint entry fills each model key; raises on any mismatch, naming the keys."""
    if use_ema and not any(k.startswith(EMA_PREFIX) for k in available):
        raise CheckpointError(f"{path}: has no EMA weights (model_ema.*); load it without use_ema")

    def source(key: str) -> str:
        take_ema = use_ema and key.startswith("model.") and ema_key(key) in available
        return ema_key(key) if take_ema else key

    mapping = {key: source(key) for key in expected}
    missing = [k for k, s in mapping.items() if s not in available]
    used = set(mapping.values())
    # The weights not chosen (EMA or not) and EMA bookkeeping are skipped on purpose.
    skipped = (EMA_PREFIX, "model.diffusion_model.") if use_ema else (EMA_PREFIX,)
    unexpected = [k for k in available - used if not k.startswith(skipped)]
    if missing or unexpected:
        model_family, file_family = _family(expected), _family(available)
        hint = ""
        if model_family and file_family and model_family != file_family:
            hint = f"; the file is {file_family} but the config builds {model_family}"
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing from the file ({_sample(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_sample(unexpected)})")
        raise CheckpointError(f"{path}: does not match the config: {'; '.join(parts)}{hint}")
    return mapping


def _shape(source: Mapping, key: str) -> tuple[int, ...]:
    return source.shape(key) if isinstance(source, LazyTensors) else tuple(source[key].shape)


def load_state_into(
    model: nn.Module, source: Mapping, use_ema: bool = False, path: str | os.PathLike = "state"
) -> None:
    """Load a checkpoint state dict into `model`, strictly, assigning the tensors in place of the
    model's (so parameters built on the meta device cost nothing) in the model's dtypes."""
    expected = model.state_dict(keep_vars=True)
    available = {k for k in source.keys() if k not in IGNORED_KEYS}
    mapping = _source_keys(expected, available, use_ema, path)
    wrong = [
        f"{key} {tuple(_shape(source, src))} vs {tuple(expected[key].shape)}"
        for key, src in mapping.items()
        if _shape(source, src) != tuple(expected[key].shape)
    ]
    if wrong:
        hint = f"; the file is {_family(available)}" if _family(available) else ""
        raise CheckpointError(
            f"{path}: {len(wrong)} tensors have other shapes than the config builds "
            f"(file vs config: {_sample(wrong, 2)}){hint}"
        )
    state = {}
    for key, src in mapping.items():
        dtype = expected[key].dtype
        if isinstance(source, LazyTensors):
            state[key] = source.read(src, dtype)
        else:
            state[key] = source[src].to(dtype)
    model.load_state_dict(state, strict=True, assign=True)


@contextmanager
def empty_parameters():
    """Modules built inside get their parameters on the meta device (no memory, no random init);
    buffers stay real, so non-persistent buffers keep their computed values."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_model(
    model_config: Mapping,
    ckpt: str | os.PathLike,
    use_ema: bool = False,
    unsafe_load: bool = False,
) -> tuple[nn.Module, Mapping, dict]:
    """Build a model from its config and load `ckpt` into it (strict; EMA weights if `use_ema`;
    `unsafe_load` allows arbitrary unpickling and any config target). Returns the model, the
    checkpoint's lazy state dict and the file's other entries."""
    source, extras = read_checkpoint(ckpt, unsafe_load=unsafe_load)
    if isinstance(source, LazyTensors):
        source.check_model_config(model_config)
    with empty_parameters():
        model = instantiate_from_config(model_config, unsafe=unsafe_load)
    load_state_into(model, source, use_ema=use_ema, path=ckpt)
    return model, source, extras


def load_model_from_config(
    config: Mapping,
    ckpt: str | os.PathLike,
    use_ema: bool = False,
    unsafe_load: bool = False,
) -> nn.Module:
    """CompVis's entry point: build `config.model` and load `ckpt` into it."""
    return load_model(config["model"], ckpt, use_ema=use_ema, unsafe_load=unsafe_load)[0]


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) payload: about what torch.save writes. Each object is
    counted once, as torch.save writes it once: a payload with shared parts (a loaded file's
    may have them) is walked in time linear in its objects, not in its expanded tree."""
    total, seen, stack = 0, set(), [obj]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.Tensor):
            total += node.nbytes
        elif isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return total


def _atomic_write(path: Path, write, nbytes: int = 0) -> None:
    """`write(tmp_path)`, fsync, then rename over `path`: a crash never leaves a half-written
    file in place of a good one. With `nbytes`, a disk without room for them is an error before
    anything is written (a full disk otherwise shows as torch's "unexpected pos")."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if nbytes and nbytes + 2**20 > free:
            raise SaveError(
                f"{path}: not enough disk space: it needs {nbytes / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB are free"
            )
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SaveError(f"{path}: cannot be written ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it normal permissions
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SaveError(f"{path}: writing failed ({e.strerror or e})") from None
    except RuntimeError as e:
        Path(tmp).unlink(missing_ok=True)
        if "unexpected pos" not in str(e) and "write failed" not in str(e):
            raise
        # torch's zip writer says this when the disk fills up while it writes.
        free = shutil.disk_usage(path.parent).free / 1e9
        raise SaveError(f"{path}: writing failed, disk full? ({free:.2f} GB free)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """torch.save, written atomically, after checking that the disk has room for it."""
    _atomic_write(Path(path), lambda tmp: torch.save(payload, tmp), tensor_bytes(payload))


def save_text(text: str, path: str | os.PathLike) -> None:
    """A text file, written atomically (a link planted at `path` is replaced, not followed)."""
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """A .safetensors file, written atomically."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def half_precision(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A state-dict entry as a lean fp16 file stores it: weights in fp16; the schedule buffers
    (top-level names) and the EMA decay stay as they are, since fp16 would shift the maths."""
    if tensor.is_floating_point() and "." in key and key != f"{EMA_PREFIX}decay":
        return tensor.half()
    return tensor
