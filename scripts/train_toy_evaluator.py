"""Train the toy world's evaluator (ldm.eval.toy) on ground-truth renders.

    python scripts/train_toy_evaluator.py --out models/toy/evaluator.safetensors

The classifier sees ordinary scenes, the world's subjects, near misses (a subject with one thing
changed) and other patterned objects, with blur, noise and colour jitter so that it reads generated
images as well as renders. It never sees a generated image. Prints its accuracy on held-out renders
and writes the weights (safetensors, the figures in the metadata).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from ldm.checkpoint import save_safetensors
from ldm.data import toyworld as tw
from ldm.eval.toy import (
    HEADS,
    ToyEvaluator,
    ToyWorldClassifier,
    labels_of,
    looks_like_a_subject,
    near_miss_scene,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="models/toy/evaluator.safetensors")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scenes", type=int, default=12000, help="ordinary scenes in the pool")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def scenes(seed: int, ordinary: int) -> list[tw.Scene]:
    """The training (or held-out) scenes: ordinary, subjects, near misses, other patterns."""
    out = [tw.scene(seed, i) for i in range(ordinary)]
    for name in tw.SUBJECTS:
        out += [tw.scene(seed, i, subject=name) for i in range(ordinary // 6)]
    out += [near_miss_scene(seed, i) for i in range(ordinary // 4)]
    patterned = [tw.patterned_scene(seed, i) for i in range(ordinary // 8)]
    out += [s for s in patterned if not looks_like_a_subject(s.look)]
    return out


def render_all(items: list[tw.Scene]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.stack([tw.as_tensor(tw.render(s)) for s in items])
    labels = [labels_of(s) for s in items]
    return images, {k: torch.tensor([lab[k] for lab in labels]) for k in HEADS}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Degradations a generated image can have, drawn per image, on x [B, 3, H, W] in [-1, 1]:
    loss of resolution and blur as strong as an autoencoder's, blotches (low-frequency noise, the
    texture of a diffusion model's not-quite-denoised latents), a drift of each colour channel,
    pixel noise, brightness and contrast. A generator's images are never sharper than its
    autoencoder's reconstructions, and its colours are never exact."""
    n, side = x.shape[0], x.shape[-1]
    u = torch.rand(n, 8, generator=generator)
    low = u[:, 0] < 0.3  # down to 16-32 pixels and back up
    for i in low.nonzero().flatten().tolist():
        small = F.interpolate(x[i : i + 1], size=16 + int(16 * u[i, 1]), mode="bilinear",
                              antialias=True)  # fmt: skip
        x[i] = F.interpolate(small, size=side, mode="bilinear")[0]
    blurred = []
    for img, b in zip(x, u[:, 2].tolist()):  # sigma 0.3-2.5 for 70% of the images
        blurred.append(TF.gaussian_blur(img, 9, 0.3 + 2.2 * b / 0.7) if b < 0.7 else img)
    x = torch.stack(blurred)
    cells = 4 * 2 ** torch.randint(0, 3, (1,), generator=generator).item()  # 4, 8 or 16 cells
    blotches = torch.randn(n, 3, cells, cells, generator=generator)
    blotches = (
        F.interpolate(blotches, size=side, mode="bilinear")
        * (0.15 * u[:, 3] * (u[:, 4] < 0.5))[:, None, None, None]
    )
    shift = 0.1 * torch.randn(n, 3, 1, 1, generator=generator)  # per channel: about 13/255
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (0.85 + 0.3 * u[:, 5])[:, None, None, None]
    bright = (0.16 * (u[:, 6] - 0.5))[:, None, None, None]
    noise = 0.08 * u[:, 7, None, None, None] * torch.randn(x.shape, generator=generator)
    x = (x - mean) * contrast + mean + bright + shift + blotches + noise
    return x.clamp(-1, 1)


def loss_of(net: ToyWorldClassifier, x: torch.Tensor, targets: dict[str, torch.Tensor]):
    logits, _ = net(x)
    return sum(F.cross_entropy(logits[k], targets[k], ignore_index=-100) for k in HEADS)


def accuracy(net: ToyWorldClassifier, images: torch.Tensor, labels: dict) -> dict[str, float]:
    readout = ToyEvaluator(net).read(images)
    result = {}
    for key, names in HEADS.items():
        mask = labels[key] >= 0
        predicted = torch.tensor([names.index(v) for v in readout.labels[key]])
        result[key] = (predicted[mask] == labels[key][mask]).float().mean().item()
    return result


def train(opt: argparse.Namespace) -> tuple[ToyWorldClassifier, dict]:
    torch.manual_seed(opt.seed)
    start = time.perf_counter()
    images, labels = render_all(scenes(opt.seed, opt.scenes))
    held_images, held_labels = render_all(scenes(opt.seed + 1, 600))
    print(f"rendered {len(images)} + {len(held_images)} scenes in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    net = ToyWorldClassifier()
    optimizer = torch.optim.AdamW(net.parameters(), lr=opt.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / opt.steps))
    )
    generator = torch.Generator().manual_seed(opt.seed)
    for step in range(1, opt.steps + 1):
        index = torch.randint(0, len(images), (opt.batch_size,), generator=generator)
        x = augment(images[index].float().div(127.5).sub(1.0), generator)
        loss = loss_of(net, x, {k: v[index] for k, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == opt.steps:
            print(f"step {step}: loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    net.eval()
    figures = accuracy(net, held_images, held_labels)
    figures["seconds"] = time.perf_counter() - start
    return net, figures


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    net, figures = train(opt)
    print("held-out accuracy: " + ", ".join(f"{k} {figures[k]:.3f}" for k in HEADS))
    metadata = {"figures": json.dumps(figures), "args": json.dumps(vars(opt))}
    state = {k: v.half() for k, v in net.state_dict().items()}  # half the file; read back as fp32
    save_safetensors(state, Path(opt.out), metadata=metadata)
    print(f"wrote {opt.out} ({Path(opt.out).stat().st_size / 2**20:.2f} MiB) "
          f"in {figures['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
