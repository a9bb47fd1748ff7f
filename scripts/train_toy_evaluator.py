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
from ldm.eval.toy import HEADS, ToyEvaluator, ToyWorldClassifier, labels_of, near_miss_scene


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
    out += [tw.patterned_scene(seed, i) for i in range(ordinary // 8)]
    return out


def render_all(items: list[tw.Scene]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.stack([tw.as_tensor(tw.render(s)) for s in items])
    labels = [labels_of(s) for s in items]
    return images, {k: torch.tensor([lab[k] for lab in labels]) for k in HEADS}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Degradations a generated image can have, drawn per image, on x [B, 3, H, W] in [-1, 1]:
    blur and loss of resolution as strong as an f=8 autoencoder's, noise, brightness and
    contrast. A generator's images are never sharper than its autoencoder's reconstructions."""
    u = torch.rand(x.shape[0], 6, generator=generator)
    out = []
    for img, (blur, low, size, noise, bright, contrast) in zip(x, u.tolist()):
        if low < 0.3:  # down to 16-32 pixels and back up
            side = 16 + int(16 * size)
            img = F.interpolate(img[None], size=side, mode="bilinear", antialias=True)
            img = F.interpolate(img, size=x.shape[-1], mode="bilinear")[0]
        if blur < 0.7:
            img = TF.gaussian_blur(img, kernel_size=9, sigma=0.3 + 2.2 * blur / 0.7)
        mean = img.mean()
        img = (img - mean) * (0.85 + 0.3 * contrast) + mean + 0.16 * (bright - 0.5)
        img = img + 0.08 * noise * torch.randn(img.shape, generator=generator)
        out.append(img)
    return torch.stack(out).clamp(-1, 1)


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
