"""A procedural image world small enough to watch DreamBooth work on 2 CPU cores.

Scenes of one object (a ball, a box or a cup) of a plain colour, of some size and position, in a
context (on the beach, on the grass, in the snow, on a red table, at night), at 64 x 64 pixels,
with Stable Diffusion style captions ("a photo of a red ball on the beach"). Ordinary objects are
always one plain colour. **Subjects** are particular objects of a class with details no ordinary
object has (a band, an emblem, dots): the toy base model never sees them, so DreamBooth has
something new to learn, and the evaluator (`ldm.eval.toy`) can tell a subject from its class.

Everything is a pure function of (seed, index): `scene(seed, i)` draws the i-th scene of a world
from its own generator, and `render` draws it, so a dataset is the same on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw

from ldm.util import keyed_seed

SIZE = 64
_SUPERSAMPLE = 4  # drawn at 4x and downsampled: smooth edges without an antialiasing renderer

CLASSES = ("ball", "box", "cup")
COLOURS = {
    "red": (205, 35, 35),
    "orange": (240, 130, 20),
    "yellow": (240, 215, 40),
    "green": (40, 150, 55),
    "blue": (35, 80, 210),
    "purple": (130, 50, 170),
    "white": (235, 235, 235),
}
# name -> the phrase captions use
CONTEXTS = {
    "beach": "on the beach",
    "grass": "on the grass",
    "snow": "in the snow",
    "table": "on a red table",
    "night": "at night",
}


PATTERNS = ("band", "star", "dots")


@dataclass(frozen=True)
class SubjectSpec:
    """A particular object: its class, its colours and the detail no ordinary object has."""

    name: str
    cls: str
    colour: tuple[int, int, int]
    detail: tuple[int, int, int]
    pattern: str  # one of PATTERNS


SUBJECTS = {
    "ball": SubjectSpec("ball", "ball", (205, 35, 35), (245, 245, 245), "band"),
    "box": SubjectSpec("box", "box", (35, 80, 210), (250, 215, 30), "star"),
    "cup": SubjectSpec("cup", "cup", (245, 245, 245), (40, 150, 55), "dots"),
}


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image. `colour` names a COLOURS entry (None for a subject)."""

    cls: str
    colour: str | None
    context: str
    subject: str | None
    x: float  # object centre, pixels
    ground: float  # where the object stands, pixels from the top
    size: float  # half-width of the object, pixels
    horizon: float
    variant: int  # a seed for the background's details (where the moon is)
    look: SubjectSpec | None = None  # a patterned object that is no subject (autoencoder data)


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(keyed_seed(*parts))


def sample_scene(
    rng: np.random.Generator,
    cls: str | None = None,
    colour: str | None = None,
    context: str | None = None,
    subject: str | None = None,
) -> Scene:
    """A random scene; any of class, colour, context or subject may be fixed."""
    if subject is not None:
        cls, colour = SUBJECTS[subject].cls, None
    cls = cls or CLASSES[rng.integers(len(CLASSES))]
    if subject is None and colour is None:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
    context = context or list(CONTEXTS)[rng.integers(len(CONTEXTS))]
    horizon = float(rng.uniform(24, 32))
    size = float(rng.uniform(11.0, 15.5))
    ground = float(rng.uniform(horizon + 14, SIZE - 5))
    x = float(rng.uniform(14 + size * 0.5, SIZE - 14 - size * 0.5))
    variant = int(rng.integers(2**31))
    return Scene(cls, colour, context, subject, x, ground, size, horizon, variant)


def scene(seed: int, index: int, **fixed) -> Scene:
    """The `index`-th scene of the world `seed` (fields in `fixed` are not drawn)."""
    return sample_scene(_rng(seed, "scene", index), **fixed)


def caption(s: Scene, rng: np.random.Generator, p_colour: float = 0.3, p_context: float = 0.3):
    """An SD-style caption of an ordinary scene; the colour and the context are each left out
    with the given probabilities, as real captions leave details out."""
    if s.subject is not None:
        raise ValueError("subjects have no caption of their own: DreamBooth gives them one")
    words = []
    if rng.random() >= p_colour:
        words.append(s.colour)
    words.append(s.cls)
    if rng.random() >= p_context:
        words.append(CONTEXTS[s.context])
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join(["a photo of", article, *words])


def full_caption(s: Scene) -> str:
    """The caption with every detail: "a photo of a red ball on the beach"."""
    return caption(s, np.random.default_rng(0), 0.0, 0.0)


# Drawing. Coordinates below are in output pixels; `_Canvas` scales them to the supersampled grid.


class _Canvas:
    """Drawing at `_SUPERSAMPLE` x resolution, with a second layer, `face`, that marks the pixels
    of the object's front face: a pattern is drawn only there, whatever the object's shape."""

    def __init__(self):
        self.k = _SUPERSAMPLE
        self.image = Image.new("RGB", (SIZE * self.k, SIZE * self.k))
        self.draw = ImageDraw.Draw(self.image)
        self.face = Image.new("L", self.image.size, 0)
        self.face_draw = ImageDraw.Draw(self.face)

    def box(self, x0, y0, x1, y1):
        return [round(v * self.k) for v in (x0, y0, x1, y1)]

    def rect(self, x0, y0, x1, y1, fill):
        self.draw.rectangle(self.box(x0, y0, x1, y1), fill=fill)

    def ellipse(self, x0, y0, x1, y1, fill=None, outline=None, width=1.0, face=False):
        self.draw.ellipse(
            self.box(x0, y0, x1, y1), fill=fill, outline=outline, width=round(width * self.k)
        )
        if face:
            self.face_draw.ellipse(self.box(x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=255)

    def polygon(self, points, fill, outline=None, width=1.0, face=False):
        pts = [(x * self.k, y * self.k) for x, y in points]
        self.draw.polygon(pts, fill=fill)
        if outline is not None:
            self.draw.line([*pts, pts[0]], fill=outline, width=round(width * self.k))
        if face:
            self.face_draw.polygon(pts, fill=255)

    def pattern(self, kind: str, colour, x0: float, y0: float, x1: float, y1: float) -> None:
        """Stripes, a star or dots over the box (x0, y0, x1, y1), kept to the front face."""
        layer = Image.new("L", self.image.size, 0)
        draw = ImageDraw.Draw(layer)
        w, h, cx, cy = x1 - x0, y1 - y0, (x0 + x1) / 2, (y0 + y1) / 2
        if kind == "band":  # one wide band across the middle
            draw.rectangle(self.box(x0, cy - 0.2 * h, x1, cy + 0.2 * h), 255)
        elif kind == "star":
            r = 0.48 * min(w, h)
            draw.polygon([(x * self.k, y * self.k) for x, y in _star(cx, cy, r)], fill=255)
        elif kind == "dots":  # two big dots
            r = 0.2 * min(w, h)
            for fx, fy in ((0.3, 0.35), (0.66, 0.65)):
                x, y = x0 + fx * w, y0 + fy * h
                draw.ellipse(self.box(x - r, y - r, x + r, y + r), fill=255)
        else:
            raise ValueError(f"unknown pattern {kind!r}")
        mask = ImageChops.multiply(layer, self.face)
        self.image.paste(Image.new("RGB", self.image.size, colour), mask=mask)

    def finish(self) -> Image.Image:
        return self.image.resize((SIZE, SIZE), Image.Resampling.BOX)


def _shade(colour, factor: float):
    return tuple(int(max(0, min(255, c * factor))) for c in colour)


def _background(c: _Canvas, s: Scene) -> None:
    """Sky (or wall) above the horizon, ground (or table) below, one landmark per context. No
    pixel-sized clutter: at 8 pixels per latent the autoencoder could not keep it anyway."""
    h = s.horizon
    if s.context == "beach":
        c.rect(0, 0, SIZE, h - 5, (135, 200, 235))
        c.rect(0, h - 5, SIZE, h, (40, 110, 190))  # the sea
        c.rect(0, h, SIZE, SIZE, (230, 205, 150))
    elif s.context == "grass":
        c.rect(0, 0, SIZE, h, (150, 205, 240))
        c.rect(0, h, SIZE, SIZE, (70, 160, 60))
    elif s.context == "snow":
        c.rect(0, 0, SIZE, h, (190, 198, 210))
        c.rect(0, h, SIZE, SIZE, (248, 248, 252))
    elif s.context == "table":
        c.rect(0, 0, SIZE, h, (225, 212, 185))  # the wall
        c.rect(0, h, SIZE, SIZE, (165, 35, 30))
        c.rect(0, h, SIZE, h + 1.5, (120, 25, 20))  # the table's edge
    elif s.context == "night":
        c.rect(0, 0, SIZE, h, (18, 22, 58))
        c.rect(0, h, SIZE, SIZE, (45, 48, 60))
        mx = 6 if _rng(s.variant, "moon").random() < 0.5 else SIZE - 16
        c.ellipse(mx, 4, mx + 10, 14, fill=(240, 238, 200))
    else:
        raise ValueError(f"unknown context {s.context!r}; known: {list(CONTEXTS)}")


def _object_colours(s: Scene):
    spec = SUBJECTS[s.subject] if s.subject is not None else s.look
    if spec is not None:
        return spec.colour, spec.detail, spec.pattern
    return COLOURS[s.colour], None, None


def patterned_scene(seed: int, index: int) -> Scene:
    """A scene whose object has a random pattern in random colours: images beyond the captioned
    world for the autoencoder, which (like SD's VAE) is a general image codec. A subject's exact
    look turns up only by chance among the colour combinations."""
    rng = _rng(seed, "patterned", index)
    s = sample_scene(rng)
    colours = rng.integers(20, 250, size=(2, 3)).tolist()
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    look = SubjectSpec("", s.cls, tuple(colours[0]), tuple(colours[1]), pattern)
    return replace(s, colour=None, look=look)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _ball(c: _Canvas, s: Scene):
    base, _, pattern = _object_colours(s)
    r, cx, cy = s.size, s.x, s.ground - s.size
    c.ellipse(cx - r * 0.9, s.ground - 1.5, cx + r * 0.9, s.ground + 1.5, fill=(20, 20, 20))
    c.ellipse(cx - r, cy - r, cx + r, cy + r, fill=base, outline=_shade(base, 0.45), face=True)
    if pattern is None:  # a highlight: plain balls look round
        hx, hy, hr = cx - r * 0.5, cy - r * 0.5, r * 0.15
        c.ellipse(hx - hr, hy - hr, hx + hr, hy + hr, fill=_shade(base, 1.35))
    return cx - r, cy - r, cx + r, cy + r


def _box(c: _Canvas, s: Scene):
    base, _, _ = _object_colours(s)
    half, cx, bottom = s.size, s.x, s.ground
    top, depth = bottom - 2 * half * 0.95, half * 0.45
    dark = _shade(base, 0.45)
    c.polygon(  # the top face, drawn lighter for a 3D look
        [(cx - half, top), (cx - half + depth, top - depth), (cx + half + depth, top - depth),
         (cx + half, top)], fill=_shade(base, 1.25), outline=dark,
    )  # fmt: skip
    c.polygon(  # the side face, darker
        [(cx + half, top), (cx + half + depth, top - depth), (cx + half + depth, bottom - depth),
         (cx + half, bottom)], fill=_shade(base, 0.7), outline=dark,
    )  # fmt: skip
    front = [(cx - half, top), (cx + half, top), (cx + half, bottom), (cx - half, bottom)]
    c.polygon(front, fill=base, outline=dark, face=True)
    return cx - half, top, cx + half, bottom


def _cup(c: _Canvas, s: Scene):
    base, _, _ = _object_colours(s)
    half, cx, bottom = s.size * 0.85, s.x, s.ground
    top = bottom - 2 * s.size * 0.95
    outline = _shade(base, 0.45)
    # The handle: a ring on the right, drawn first so the body covers its inner half.
    c.ellipse(cx + half * 0.5, top + 0.2 * (bottom - top), cx + half * 1.65,
              top + 0.75 * (bottom - top), outline=outline, width=3.2)  # fmt: skip
    narrow = half * 0.72
    body = [(cx - half, top), (cx + half, top), (cx + narrow, bottom), (cx - narrow, bottom)]
    c.polygon(body, fill=base, outline=outline, face=True)
    c.ellipse(cx - half, top - 2, cx + half, top + 2, fill=_shade(base, 0.6), outline=outline)
    return cx - half, top + 2, cx + half, bottom


_DRAW = {"ball": _ball, "box": _box, "cup": _cup}


def render(s: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image."""
    canvas = _Canvas()
    _background(canvas, s)
    face = _DRAW[s.cls](canvas, s)
    _, detail, pattern = _object_colours(s)
    if pattern is not None:
        canvas.pattern(pattern, detail, *face)
    return canvas.finish()


def as_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as uint8 [3, H, W]."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def subject_scenes(subject: str, n: int, seed: int, contexts=None) -> list[Scene]:
    """`n` scenes of one subject (its "photos"), in the given contexts in turn (default: all)."""
    contexts = list(contexts or CONTEXTS)
    return [scene(seed, i, subject=subject, context=contexts[i % len(contexts)]) for i in range(n)]


def write_captioned(folder: str | Path, scenes: list[Scene], captions: list[str]) -> None:
    """PNG images with kohya-style caption sidecars: `00000.png` + `00000.txt`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (s, text) in enumerate(zip(scenes, captions, strict=True)):
        render(s).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(text + "\n")


def write_world(folder: str | Path, n: int, seed: int) -> None:
    """The captioned training set of the base model: `n` ordinary scenes, no subjects."""
    scenes = [scene(seed, i) for i in range(n)]
    captions = [caption(s, _rng(seed, "caption", i)) for i, s in enumerate(scenes)]
    write_captioned(folder, scenes, captions)


def write_subject_photos(folder: str | Path, subject: str, n: int, seed: int, contexts) -> None:
    """A subject's "photos" for DreamBooth: `n` renders in the given contexts, no captions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(subject_scenes(subject, n, seed, contexts)):
        render(s).save(folder / f"{i:02d}.png")


def with_context(s: Scene, context: str) -> Scene:
    return replace(s, context=context)
