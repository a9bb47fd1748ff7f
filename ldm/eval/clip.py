"""CLIP image and text embeddings (via open_clip) for the DreamBooth CLIP-I and CLIP-T metrics.

The default is OpenAI's ViT-B/32: the DreamBooth paper does not name its CLIP model, and the public
DreamBench evaluations (ImagenHub's DreamBooth metrics, textual-inversion's `CLIPEvaluator`) use
OpenAI ViT-B/32. Images go through open_clip's inference preprocessing for the arch, which for the
OpenAI models is OpenAI's own: resize 224 (bicubic), center crop 224, CLIP mean/std.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.checkpoint_rules import check_torch_zip
from ldm.eval.weights import require_file

DEFAULT_ARCH = "ViT-B-32"


def clip_weights_hint(arch: str) -> str:
    """Where to get a CLIP file for `arch` in open_clip's plain state-dict layout."""
    # OpenAI's own release is a TorchScript archive, which torch.load(weights_only=True) refuses;
    # open_clip publishes the same weights as plain state dicts on the HF hub.
    hub = open_clip.get_pretrained_cfg(arch, "openai").get("hf_hub", "").rstrip("/")
    if hub:
        return (
            f"https://huggingface.co/{hub} (open_clip_model.safetensors or "
            "open_clip_pytorch_model.bin)"
        )
    return f"an open_clip checkpoint for {arch}, one of {open_clip.list_pretrained_tags_by_model(arch)}"


class CLIPEmbedder(nn.Module):
    """An open_clip model with its inference preprocessing and tokenizer; embeddings are L2-normalised."""

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
    ):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, S, S] -> unit image embeddings [B, D]."""
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> unit text embeddings [len(prompts), D]."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts)).to(device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def load_clip(
    path: str | Path,
    arch: str = DEFAULT_ARCH,
    quick_gelu: bool = True,
    device: str | torch.device = "cpu",
) -> CLIPEmbedder:
    """CLIP `arch` (an open_clip model name) with the weights in the local file `path`.

    `quick_gelu=True` is right for OpenAI weights, which were trained with QuickGELU; open_clip
    switches it on by itself only for its `openai` download tag, never for a file path, and the
    wrong activation loads without error but gives different embeddings. Use False for LAION
    or DataComp weights of the non-`-quickgelu` archs.
    """
    arch = arch.replace("/", "-")  # "ViT-B/32", as OpenAI writes it, is open_clip's "ViT-B-32"
    # Absolute, so a file named like a download tag (e.g. "openai") can't be taken for the tag.
    hint = clip_weights_hint(arch)
    path = require_file(path, hint).resolve()
    if path.suffix != ".safetensors":  # open_clip reads it (weights_only); no zip bomb first
        check_torch_zip(path)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(path), force_quick_gelu=quick_gelu, device=device
        )
    except RuntimeError as e:
        raise RuntimeError(f"{path}: {e} (expected {hint})".replace("\n", " ")) from e
    return CLIPEmbedder(model, preprocess, open_clip.get_tokenizer(arch))
