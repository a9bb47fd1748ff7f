"""Reading the evaluation networks' weight files: one clear error for a missing file or a key mismatch.

None of these networks is downloaded at run time; the user fetches each file once and passes its path.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.checkpoint_rules import check_tensors, check_torch_zip

DINO_VITS16_URL = (
    "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
)
LPIPS_LIN_URLS = {
    "alex": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
    "vgg": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
}
TORCHVISION_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}

_KEYS_SHOWN = 8


def require_file(path: str | Path, url: str) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming the file and where to get it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path} (download it from {url})")
    return path


def load_state_dict_file(path: str | Path, url: str) -> dict[str, torch.Tensor]:
    """Load a plain state dict (`.pth`/`.pt`/`.bin` or `.safetensors`) onto the CPU, tensors only,
    under the rules any checkpoint obeys (ldm.checkpoint_rules): a weight file is someone else's."""
    path = require_file(path, url)
    if path.suffix == ".safetensors":
        state_dict = load_file(path, device="cpu")  # the library checks the format's rules
    else:
        check_torch_zip(path)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        check_tensors(path, state_dict)
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError(
            f"{path} is not a plain state dict of tensors (expected the file at {url})"
        )
    return state_dict


def _list_keys(keys: set[str]) -> str:
    shown = sorted(keys)[:_KEYS_SHOWN]
    more = f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(shown) + more


def check_keys(found: set[str], expected: set[str], path: str | Path) -> None:
    """Raise RuntimeError naming the missing and unexpected keys if `found` differs from `expected`."""
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_list_keys(unexpected)}")
        raise RuntimeError(f"{path}: state dict does not match the network; " + "; ".join(parts))


def load_strict(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path
) -> None:
    """`module.load_state_dict(strict=True)` with a one-line error that names the mismatched keys."""
    check_keys(set(state_dict), set(module.state_dict()), path)
    module.load_state_dict(state_dict, strict=True)
