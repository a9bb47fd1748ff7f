"""The toy world's evaluator: a small classifier trained on ground-truth renders, never on
generated images, so it judges the generator without being part of it.

It reads an image's class, context, colour and subject identity ("none" or one of the world's
subjects), and gives the world's analogues of the paper's metrics (`ldm.eval.metrics`):

- subject fidelity: `subject_rate` (samples it calls the subject) and `subject_sim` (mean cosine
  similarity of its embeddings of samples and of the subject's real renders, DINO's analogue);
- prompt fidelity: `prompt_fidelity`, the samples showing the prompted context (CLIP-T's role);
- PRES: `pres`, the class-prompt samples it calls the subject (lower is better), and `pres_sim`,
  their embedding similarity to the subject's renders (the paper's DINO form of PRES);
- DIV: `div`, the mean pairwise distance of same-prompt samples in the classifier's feature maps
  (channel-normalised and spatially averaged, as LPIPS does without its learned weights), and
  `class_div`, that of the class-prompt samples;
- the subject's body colour as the colour head reads it: `colour_rate` (subject-prompt samples)
  and `pres_colour` (class-prompt samples).

Its training images are degraded the way generated ones are (blur, lost resolution, blotches,
colours off by a shade), and its near misses differ from a subject by a whole colour, so it calls
a generated subject the subject, and not a box that merely has a blue body.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoint import load_model, load_state_into, read_checkpoint
from ldm.data import toyworld as tw
from ldm.sample import generate, seeded_noise, to_pil
from ldm.util import keyed_seed

NONE = "none"
ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "configs" / "toy" / "base.yaml"
BASE_WEIGHTS = ROOT / "models" / "toy" / "base.safetensors"
EVALUATOR_WEIGHTS = ROOT / "models" / "toy" / "evaluator.safetensors"
HEADS = {
    "cls": tw.CLASSES,
    "context": tuple(tw.CONTEXTS),
    "colour": tuple(tw.COLOURS),
    "subject": (NONE, *tw.SUBJECTS),
}


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class ToyWorldClassifier(nn.Module):
    """64 x 64 RGB in [-1, 1] -> logits of each head in `HEADS`, and a 128-d embedding."""

    WIDTHS = (32, 64, 96, 128)

    def __init__(self):
        super().__init__()
        widths = self.WIDTHS
        self.stages = nn.ModuleList(
            [_block(3, widths[0], 1)]
            + [_block(a, b, 2) for a, b in zip(widths[:-1], widths[1:])]
            + [_block(widths[-1], widths[-1], 2)]
        )
        self.heads = nn.ModuleDict({k: nn.Linear(widths[-1], len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after each stage: [B, 32, 64, 64], ..., [B, 128, 4, 4]."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        embedding = self.features(x)[-1].mean(dim=(2, 3))  # [B, 128]
        return {k: head(embedding) for k, head in self.heads.items()}, embedding


def to_input(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """PIL images (resized to 64 x 64 if need be) or uint8 [B, 3, 64, 64] -> float [-1, 1]."""
    if not isinstance(images, torch.Tensor):
        size = (tw.SIZE, tw.SIZE)
        resized = [
            i if i.size == size else i.resize(size, Image.Resampling.BICUBIC) for i in images
        ]
        images = torch.stack([tw.as_tensor(i) for i in resized])
    return images.float().div(127.5).sub(1.0)


@dataclass
class Readout:
    """What the classifier sees in a batch of images."""

    labels: dict[str, list[str]]  # head -> predicted label per image
    embeddings: torch.Tensor  # [B, 128]
    features: list[torch.Tensor]  # per stage, [B, C, h, w]


class ToyEvaluator:
    """The metrics of the toy world, from a trained `ToyWorldClassifier`."""

    def __init__(self, classifier: ToyWorldClassifier, batch_size: int = 64):
        self.net = classifier.eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image] | torch.Tensor) -> Readout:
        x = to_input(images)
        labels: dict[str, list[str]] = {k: [] for k in HEADS}
        embeddings, features = [], []
        for part in x.split(self.batch_size):
            maps = self.net.features(part)
            embedding = maps[-1].mean(dim=(2, 3))
            for key, head in self.net.heads.items():
                labels[key] += [HEADS[key][i] for i in head(embedding).argmax(-1).tolist()]
            embeddings.append(embedding)
            features.append(maps)
        stages = [torch.cat([f[i] for f in features]) for i in range(len(features[0]))]
        return Readout(labels, torch.cat(embeddings), stages)

    def diversity(self, readout: Readout, groups: Sequence[Sequence[int]]) -> float:
        """Mean pairwise feature distance within each group of image indices (e.g. the samples
        of one prompt), averaged over the groups with at least 2 images."""
        scores = []
        for group in groups:
            if len(group) < 2:
                continue
            maps = [F.normalize(f[list(group)], dim=1) for f in readout.features]
            i, j = torch.triu_indices(len(group), len(group), offset=1)
            distance = sum((m[i] - m[j]).pow(2).sum(1).mean(dim=(1, 2)) for m in maps)
            scores.append(distance.mean().item())
        return sum(scores) / len(scores) if scores else math.nan


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).mean().item()


def fraction(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


NEAR_MISS_DISTANCE = 120.0  # RGB distance of a near miss's changed colour from the subject's


def looks_like_a_subject(look: tw.SubjectSpec) -> bool:
    """A patterned object within NEAR_MISS_DISTANCE of a subject in both colours, with its class
    and pattern: as a training image it could not be told from the subject by eye."""
    return any(
        look.cls == spec.cls
        and look.pattern == spec.pattern
        and math.dist(look.colour, spec.colour) < NEAR_MISS_DISTANCE
        and math.dist(look.detail, spec.detail) < NEAR_MISS_DISTANCE
        for spec in tw.SUBJECTS.values()
    )


def near_miss_scene(seed: int, index: int) -> tw.Scene:
    """A subject with another body or detail colour: no subject, but close to one, so the
    classifier learns the subject's whole look rather than "has a pattern". The new colour is at
    least NEAR_MISS_DISTANCE from the one it replaces: a generator's colours drift by less, and a
    near miss that differs by a shade would teach the classifier to reject faithful samples."""
    rng = np.random.default_rng(keyed_seed(seed, "near-miss", index))
    spec = tw.SUBJECTS[list(tw.SUBJECTS)[rng.integers(len(tw.SUBJECTS))]]
    field = "colour" if rng.random() < 0.5 else "detail"
    while True:
        colour = tuple(int(v) for v in rng.integers(20, 250, size=3))
        if math.dist(colour, getattr(spec, field)) >= NEAR_MISS_DISTANCE:
            break
    spec = replace(spec, **{field: colour})
    scene = tw.sample_scene(rng, cls=spec.cls)
    return replace(scene, colour=None, look=replace(spec, name=""))


def labels_of(scene: tw.Scene) -> dict[str, int]:
    """Training targets of a scene; -100 (ignored) for the colour of a patterned object."""
    colour = HEADS["colour"].index(scene.colour) if scene.colour is not None else -100
    subject = HEADS["subject"].index(scene.subject or NONE)
    return {
        "cls": HEADS["cls"].index(scene.cls),
        "context": HEADS["context"].index(scene.context),
        "colour": colour,
        "subject": subject,
    }


def load_toy_base(path: str | Path = BASE_WEIGHTS, config: str | Path = BASE_CONFIG):
    """The toy base model (or a checkpoint of the same architecture), strictly loaded, in fp32
    and eval mode."""
    from ldm.config_files import read_config_file  # the evaluator alone needs no config machinery

    model, _, _ = load_model(read_config_file(config).model, path)
    return model.float().eval()


def load_toy_evaluator(path: str | Path = EVALUATOR_WEIGHTS, batch_size: int = 64) -> ToyEvaluator:
    """The classifier from its weight file (strict, through the checkpoint loader)."""
    net = ToyWorldClassifier()
    source, _ = read_checkpoint(path)
    load_state_into(net, source, path=path)
    return ToyEvaluator(net, batch_size)


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt and what a faithful image of it shows (None: not prescribed)."""

    text: str
    cls: str | None = None
    context: str | None = None
    colour: str | None = None


def subject_prompts(token: str, class_noun: str, cls: str, contexts=None) -> list[ToyPrompt]:
    """ "a photo of a sks ball on the beach", ... for each context: DreamBench's recontextualisation
    prompts in the toy world. `class_noun` is the word in the prompt ('' for none, or a wrong
    one); `cls` the subject's real class."""
    contexts = list(contexts or tw.CONTEXTS)
    words = lambda ctx: ["a photo of a", token, class_noun, tw.CONTEXTS[ctx]]  # noqa: E731
    return [ToyPrompt(" ".join(w for w in words(c) if w), cls, c) for c in contexts]


def class_prompt(cls: str) -> ToyPrompt:
    """The prior-preservation prompt, "a photo of a ball"."""
    return ToyPrompt(f"a photo of a {cls}", cls)


def base_prompts(seed: int, n: int) -> list[ToyPrompt]:
    """`n` fully specified prompts of ordinary scenes ("a photo of a red ball on the beach")."""
    scenes = [tw.scene(seed, i) for i in range(n)]
    return [ToyPrompt(tw.full_caption(s), s.cls, s.context, s.colour) for s in scenes]


def prompt_accuracy(readout: Readout, prompts: Sequence[ToyPrompt]) -> dict[str, float]:
    """The share of images that show each prescribed attribute of their prompt."""
    result = {}
    for head, field in (("cls", "cls"), ("context", "context"), ("colour", "colour")):
        hits = [
            readout.labels[head][i] == getattr(p, field)
            for i, p in enumerate(prompts)
            if getattr(p, field) is not None
        ]
        result[f"{head}_acc"] = fraction(hits)
    return result


def groups_by_prompt(prompts: Sequence[ToyPrompt]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.text, []).append(i)
    return list(groups.values())


def subject_colour(subject: str) -> str:
    """The colour name of a subject's body ("blue" for the box): what the colour head reads."""
    rgb = tw.SUBJECTS[subject].colour
    return min(tw.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(tw.COLOURS[c], rgb)))


def subject_metrics(
    evaluator: ToyEvaluator,
    samples: Sequence[Image.Image],
    prompts: Sequence[ToyPrompt],
    real: Sequence[Image.Image],
    class_samples: Sequence[Image.Image],
    subject: str,
) -> dict[str, float]:
    """The paper's per-subject metrics in the toy world (see the module docstring)."""
    read, real_read = evaluator.read(samples), evaluator.read(real)
    accuracy = prompt_accuracy(read, prompts)
    colour = subject_colour(subject)
    result = {
        "subject_rate": fraction([s == subject for s in read.labels["subject"]]),
        "subject_sim": mean_cosine(read.embeddings, real_read.embeddings),
        "colour_rate": fraction([c == colour for c in read.labels["colour"]]),
        "prompt_fidelity": accuracy["context_acc"],
        "class_acc": accuracy["cls_acc"],
        "div": evaluator.diversity(read, groups_by_prompt(prompts)),
    }
    if class_samples:
        class_read = evaluator.read(class_samples)
        result["pres"] = fraction([s == subject for s in class_read.labels["subject"]])
        result["pres_sim"] = mean_cosine(class_read.embeddings, real_read.embeddings)
        result["pres_colour"] = fraction([c == colour for c in class_read.labels["colour"]])
        result["class_div"] = evaluator.diversity(class_read, [range(len(class_samples))])
    return result


def sample(
    model,
    prompts: Sequence[ToyPrompt],
    n_per_prompt: int,
    seed: int,
    ddim_steps: int = 50,
    scale: float = 5.0,
    batch_size: int = 64,
) -> tuple[list[Image.Image], list[ToyPrompt]]:
    """`n_per_prompt` images of each prompt from fixed seeds (image j of prompt i starts from
    the noise of keyed_seed(seed, prompt text, j)); returns the images and their prompts."""
    todo = [(p, keyed_seed(seed, p.text, j)) for p in prompts for j in range(n_per_prompt)]
    shape = model.latent_shape(tw.SIZE, tw.SIZE)
    images = []
    for start in range(0, len(todo), batch_size):
        part = todo[start : start + batch_size]
        x = generate(
            model,
            [p.text for p, _ in part],
            seeded_noise([s for _, s in part], shape),
            ddim_steps=ddim_steps,
            scale=scale,
            precision="full",
        )
        images += to_pil(x)
    return images, [p for p, _ in todo]


def evaluate_dreambooth(
    model,
    evaluator: ToyEvaluator,
    subject: str,
    token: str = "sks",
    class_noun: str | None = None,
    n_per_prompt: int = 8,
    n_class: int = 32,
    seed: int = 0,
    ddim_steps: int = 50,
    scale: float = 5.0,
) -> dict[str, float]:
    """Sample a DreamBooth model of a toy subject in every context and its class prompt, and
    measure it against renders of the subject (`subject_metrics`). `class_noun` is the noun the
    model was trained with (default: the subject's class; '' for none)."""
    cls = tw.SUBJECTS[subject].cls
    noun = cls if class_noun is None else class_noun
    samples, prompts = sample(
        model, subject_prompts(token, noun, cls), n_per_prompt, seed, ddim_steps, scale
    )
    class_samples, _ = sample(model, [class_prompt(cls)], n_class, seed, ddim_steps, scale)
    real = [tw.render(s) for s in tw.subject_scenes(subject, 16, seed=12345)]
    return subject_metrics(evaluator, samples, prompts, real, class_samples, subject)


def evaluate_base(
    model,
    evaluator: ToyEvaluator,
    n: int = 100,
    seed: int = 0,
    ddim_steps: int = 50,
    scale: float = 5.0,
) -> dict[str, float]:
    """The base model's prompt accuracy (class, context, colour) on `n` ordinary prompts, and
    the diversity of its class-prompt samples."""
    samples, prompts = sample(model, base_prompts(seed, n), 1, seed, ddim_steps, scale)
    readout = evaluator.read(samples)
    result = prompt_accuracy(readout, prompts)
    # Any subject in an ordinary prompt's image would be a leak: the base never saw one.
    result["subject_rate"] = fraction([s != NONE for s in readout.labels["subject"]])
    for cls in tw.CLASSES:
        images, _ = sample(model, [class_prompt(cls)], 16, seed, ddim_steps, scale)
        result[f"class_div_{cls}"] = evaluator.diversity(evaluator.read(images), [range(16)])
    return result
