"""The DreamBooth metrics (Ruiz et al., CVPR 2023, Sec. 4.1), per subject.

- DINO: mean cosine similarity of DINO ViT-S/16 CLS embeddings over all generated x real pairs.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine similarity of each generated image's CLIP embedding with that of its prompt.
  The prompt is embedded WITHOUT the identifier token ("a dog in the snow", not "a sks dog in the
  snow"), as DreamBench evaluations do: the rare token means nothing to CLIP's text encoder.
- PRES: DINO similarity of images generated with the class prompt "a [class noun]" to the real
  subject images, over all pairs; lower is better (high means the class prior collapsed onto the
  subject).
- DIV: mean LPIPS distance over pairs i < j of images of the same subject and prompt, averaged over
  prompts; higher is better.

Averaging the per-subject numbers over the 30 DreamBench subjects is left to the caller.
"""

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from ldm.eval.clip import DEFAULT_ARCH, CLIPEmbedder, load_clip
from ldm.eval.lpips import load_lpips
from ldm.eval.vit import dino_transform, load_dino


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all N * M pairs of rows of `a` [N, D] and `b` [M, D]."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return (a @ b.T).mean().item()


def clip_t_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine similarity of image i [N, D] with its own prompt i [N, D] (zipped, not pairwise)."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"need one prompt embedding per image, got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return cos.mean().item()


@torch.no_grad()
def mean_pairwise_lpips(
    lpips_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 16,
) -> float:
    """Mean LPIPS distance over the N(N-1)/2 pairs i < j of `images` [N, 3, H, W] in [-1, 1]."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"LPIPS diversity needs at least 2 images, got {n}")
    i, j = torch.triu_indices(n, n, offset=1, device=images.device)
    dists = [
        lpips_model(images[i[s : s + batch_size]], images[j[s : s + batch_size]]).flatten()
        for s in range(0, i.numel(), batch_size)
    ]
    return torch.cat(dists).float().mean().item()


def strip_identifier(prompt: str, token: str) -> str:
    """Remove the identifier word `token` from `prompt`: ("a sks dog in the snow", "sks") ->
    "a dog in the snow". Only whole words match ("asks" stays); a prompt without it is unchanged."""
    if not token.strip():
        raise ValueError("the identifier token is empty")
    stripped = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt)
    return " ".join(stripped.split())


@torch.no_grad()
def embed_images(
    net: nn.Module,
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 32,
) -> torch.Tensor:
    """Run `net` on `transform(image)` for each image, in batches -> embeddings [N, D] (float32, CPU)."""
    device = next(net.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        batch = torch.stack([transform(img.convert("RGB")) for img in images[s : s + batch_size]])
        out.append(net(batch.to(device)).float().cpu())
    return torch.cat(out)


def lpips_tensor(images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] in [-1, 1], resized (bicubic) to size x size if `size` is given."""
    tensors = []
    for img in images:
        img = img.convert("RGB")
        if size is not None:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        tensors.append(TF.to_tensor(img) * 2 - 1)
    if len({t.shape for t in tensors}) > 1:
        raise ValueError("LPIPS needs images of one size; set lpips_size to resize them")
    return torch.stack(tensors)


class Evaluator:
    """The three frozen networks (DINO ViT-S/16, CLIP, LPIPS) and the metrics of one subject."""

    def __init__(
        self,
        dino: nn.Module,
        clip: CLIPEmbedder,
        lpips: nn.Module,
        batch_size: int = 32,
        lpips_size: int | None = None,
    ):
        # Every network here is a fixed measuring instrument: frozen once, here.
        self.dino = dino.eval().requires_grad_(False)
        self.clip = clip.eval().requires_grad_(False)
        self.lpips = lpips.eval().requires_grad_(False)
        self.dino_transform = dino_transform()
        self.batch_size = batch_size
        self.lpips_size = lpips_size

    @classmethod
    def from_weights(
        cls,
        dino_path: str | Path,
        clip_path: str | Path,
        lpips_path: str | Path,
        lpips_backbone_path: str | Path,
        clip_arch: str = DEFAULT_ARCH,
        clip_quick_gelu: bool = True,
        lpips_net: str = "alex",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        lpips_size: int | None = None,
    ) -> "Evaluator":
        """Build the networks from local weight files (see `ldm.eval.weights` for where to get them)."""
        return cls(
            load_dino(dino_path, device),
            load_clip(clip_path, clip_arch, clip_quick_gelu, device),
            load_lpips(lpips_path, lpips_backbone_path, lpips_net, device),
            batch_size=batch_size,
            lpips_size=lpips_size,
        )

    def _dino(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return embed_images(self.dino, images, self.dino_transform, self.batch_size)

    def _clip(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return embed_images(self.clip, images, self.clip.preprocess, self.batch_size)

    @torch.no_grad()
    def prompt_embeddings(self, prompts: Sequence[str], token: str) -> torch.Tensor:
        """CLIP embeddings [N, D] of the prompts with the identifier `token` removed."""
        texts = [strip_identifier(p, token) for p in prompts]
        unique = list(dict.fromkeys(texts))
        emb = self.clip.encode_texts(unique).cpu()
        row = {t: k for k, t in enumerate(unique)}
        return emb[[row[t] for t in texts]]

    def diversity(self, generated: Sequence[tuple[Image.Image, str]]) -> float:
        """DIV: mean pairwise LPIPS within each prompt's images, averaged over prompts with >= 2."""
        groups: dict[str, list[Image.Image]] = {}
        for img, prompt in generated:
            groups.setdefault(prompt, []).append(img)
        device = next(self.lpips.parameters()).device
        scores = [
            mean_pairwise_lpips(self.lpips, lpips_tensor(imgs, self.lpips_size).to(device))
            for imgs in groups.values()
            if len(imgs) >= 2
        ]
        return sum(scores) / len(scores) if scores else math.nan

    def evaluate_subject(
        self,
        generated: Sequence[tuple[Image.Image, str]],
        real: Sequence[Image.Image],
        class_images: Sequence[Image.Image] | None,
        token: str,
    ) -> dict[str, float]:
        """DINO, CLIP-I, CLIP-T, PRES and DIV of one subject.

        generated: (image, prompt) pairs, prompts with the identifier (e.g. "a sks dog in the snow").
        real: the subject's real images. class_images: images generated with "a [class noun]" for
        PRES, or None (then "pres" is NaN). token: the identifier, removed from prompts for CLIP-T.
        """
        images = [img for img, _ in generated]
        dino_real = self._dino(real)
        clip_gen = self._clip(images)
        return {
            "dino": mean_pairwise_cosine(self._dino(images), dino_real),
            "clip_i": mean_pairwise_cosine(clip_gen, self._clip(real)),
            "clip_t": clip_t_score(
                clip_gen, self.prompt_embeddings([p for _, p in generated], token)
            ),
            "pres": mean_pairwise_cosine(self._dino(class_images), dino_real)
            if class_images
            else math.nan,
            "div": self.diversity(generated),
        }
