"""DreamBench (Ruiz et al. 2023): the 30 subjects, their class nouns and the 25 evaluation prompts.

Copied from the dataset's `prompts_and_classes.txt`, so evaluation works without the dataset at
hand; only the subjects' photos live outside the repository (`--dreambench_root`). The official
prompts are `'a {0} {1} in the jungle'.format(unique_token, class_token)`; here they are templates
with `{token}` and `{class}`, the fields the training prompts use. "Live" subjects (the dogs and
cats) get prompts about outfits and accessories, objects get prompts about materials and places.
"""

from dataclasses import dataclass
from pathlib import Path

from ldm.data.dreambooth import format_prompt as fill_template
from ldm.data.images import DataError, list_images

SUBJECT_CLASSES = {
    "backpack": "backpack",
    "backpack_dog": "backpack",
    "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl",
    "can": "can",
    "candle": "candle",
    "cat": "cat",
    "cat2": "cat",
    "clock": "clock",
    "colorful_sneaker": "sneaker",
    "dog": "dog",
    "dog2": "dog",
    "dog3": "dog",
    "dog5": "dog",
    "dog6": "dog",
    "dog7": "dog",
    "dog8": "dog",
    "duck_toy": "toy",
    "fancy_boot": "boot",
    "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy",
    "pink_sunglasses": "glasses",
    "poop_emoji": "toy",
    "rc_car": "toy",
    "red_cartoon": "cartoon",
    "robot_toy": "toy",
    "shiny_sneaker": "sneaker",
    "teapot": "teapot",
    "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
LIVE_CLASSES = frozenset({"dog", "cat"})

# The first 10 and the last 5 prompts are shared; the middle 10 differ.
_PLACES = [
    "a {token} {class} in the jungle",
    "a {token} {class} in the snow",
    "a {token} {class} on the beach",
    "a {token} {class} on a cobblestone street",
    "a {token} {class} on top of pink fabric",
    "a {token} {class} on top of a wooden floor",
    "a {token} {class} with a city in the background",
    "a {token} {class} with a mountain in the background",
    "a {token} {class} with a blue house in the background",
    "a {token} {class} on top of a purple rug in a forest",
]
_PROPERTIES = [
    "a red {token} {class}",
    "a purple {token} {class}",
    "a shiny {token} {class}",
    "a wet {token} {class}",
    "a cube shaped {token} {class}",
]
OBJECT_TEMPLATES = (
    *_PLACES,
    "a {token} {class} with a wheat field in the background",
    "a {token} {class} with a tree and autumn leaves in the background",
    "a {token} {class} with the Eiffel Tower in the background",
    "a {token} {class} floating on top of water",
    "a {token} {class} floating in an ocean of milk",
    "a {token} {class} on top of green grass with sunflowers around it",
    "a {token} {class} on top of a mirror",
    "a {token} {class} on top of the sidewalk in a crowded street",
    "a {token} {class} on top of a dirt road",
    "a {token} {class} on top of a white rug",
    *_PROPERTIES,
)
LIVE_TEMPLATES = (
    *_PLACES,
    "a {token} {class} wearing a red hat",
    "a {token} {class} wearing a santa hat",
    "a {token} {class} wearing a rainbow scarf",
    "a {token} {class} wearing a black top hat and a monocle",
    "a {token} {class} in a chef outfit",
    "a {token} {class} in a firefighter outfit",
    "a {token} {class} in a police outfit",
    "a {token} {class} wearing pink glasses",
    "a {token} {class} wearing a yellow shirt",
    "a {token} {class} in a purple wizard outfit",
    *_PROPERTIES,
)
# PRES: images of the prior class, "a [class noun]" (paper, Sec. 4.3).
CLASS_TEMPLATE = "a {class}"


def prompts_for(class_word: str, token: str, live: bool) -> list[str]:
    """The 25 DreamBench prompts for a subject of class `class_word` behind identifier `token`
    ("a sks dog in the jungle", ...); class_word "" (the no-class-noun ablation) folds the gap."""
    templates = LIVE_TEMPLATES if live else OBJECT_TEMPLATES
    return [fill_template(t, token, class_word) for t in templates]


def class_prompt(class_word: str) -> str:
    """The prior-class prompt for PRES: "a dog"."""
    return fill_template(CLASS_TEMPLATE, "", class_word)


@dataclass(frozen=True)
class Subject:
    """A subject to evaluate: its name, true class noun, prompt set and real photos' folder."""

    name: str
    class_word: str
    live: bool
    real_dir: Path

    def real_images(self) -> list[Path]:
        """The subject's photos; none is a DataError."""
        paths = list_images(self.real_dir)
        if not paths:
            raise DataError(self.real_dir, "no images")
        return paths


def dreambench_subject(name: str, root: str | Path) -> Subject:
    """DreamBench subject `name` ("dog", "backpack", ...) with photos in `root/name`."""
    if name not in SUBJECT_CLASSES:
        raise ValueError(
            f"unknown DreamBench subject {name!r}; one of {', '.join(SUBJECT_CLASSES)}"
        )
    class_word = SUBJECT_CLASSES[name]
    return Subject(name, class_word, class_word in LIVE_CLASSES, Path(root) / name)


def custom_subject(real_dir: str | Path, class_word: str, live: bool | None = None) -> Subject:
    """A user's own subject: photos in `real_dir`, of class `class_word`; `live` defaults to
    DreamBench's rule (dogs and cats get the live-subject prompts)."""
    if not class_word.strip():
        raise ValueError("a subject needs its class noun (--class_word) for the prompts and PRES")
    live = class_word in LIVE_CLASSES if live is None else live
    return Subject(Path(real_dir).name, class_word, live, Path(real_dir))
