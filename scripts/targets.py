"""Evaluation targets: what scripts/ablate.py trains each variant on and measures it against,
and what scripts/sweep.py --evaluate measures each run against.

A target is a list of subjects. For each subject it gives
- the training data of a DreamBooth run (`TargetSubject`): the folder of instance photos, the
  class noun, and any other `data.*` setting its runs need (captions, the prompt template
  data.instance_template, ...), merged into the run's config before the variant's;
- the evaluation of a finished run of that subject (`Target.evaluate`): the run's last.ckpt
  measured into named figures. The runner records them in the run's summary as `eval/<name>`
  (summary.json, TensorBoard's HParams view, W&B), where the sweep and ablation tables read them.

Two kinds exist: DreamBench subjects and your own photos, both measured by scripts/evaluate.py
(DINO, CLIP-I, CLIP-T, PRES, DIV, as the paper). Another kind (e.g. the toy world: subjects
rendered by ldm.data.toyworld, measured by ldm.eval.toy) is a frozen dataclass that subclasses
`Target`, is added to `TARGETS`, and gets its flags in `target_of`. Its fields must be plain values
(strings, numbers, tuples of them): a GPU worker process rebuilds it from the job's JSON
(`to_json`, `from_json`). What is costly to build, the networks that measure, comes from `load`,
once per process (tests pass tiny ones), and is handed to `evaluate`.
"""

import argparse
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from ldm.data import toyworld
from ldm.eval import toy_runs
from ldm.eval.dreambench import custom_subject, dreambench_subject
from ldm.eval.report import HEADERS, METRICS, PAPER_TABLE3, PAPER_TABLE4
from ldm.eval.toy import load_toy_evaluator
from scripts import evaluate

WRONG_CLASSES = ("can", "backpack")  # the paper's example, and a stand-in for the can subject


@dataclass(frozen=True)
class TargetSubject:
    """One subject's training data, as the data.* settings of its runs."""

    name: str  # unique in its target, a folder name: runs go to OUT/runs/<name>/<variant>/
    class_word: str  # its true class noun (ablations drop or replace it in training)
    photos: str  # the folder of its instance images (data.instance_root)
    data: tuple[tuple[str, Any], ...] = ()  # other data.* settings, e.g. (("captions", True),)

    def data_config(self) -> dict[str, Any]:
        """The `data` section of its runs' subject config."""
        return {
            "instance_root": str(Path(self.photos).resolve()),
            "class_word": self.class_word,
            **dict(self.data),
        }


class Target(ABC):
    """Subjects to train on, and how a finished run of one of them is measured."""

    kind: ClassVar[str]  # its name in TARGETS and in a job's JSON
    metrics: ClassVar[tuple[str, ...]]  # the figures `evaluate` returns, in table order
    subject_metrics: ClassVar[tuple[str, ...]]  # those of subject fidelity (the class-noun table)
    headers: ClassVar[Mapping[str, str]] = {}  # column titles (default: the figure's name)
    # Published rows to print beside ours, per ablation table ("prior", "class_noun"):
    # {row label: {figure: value}}.
    paper: ClassVar[Mapping[str, Mapping[str, Mapping[str, float]]]] = {}
    notes: ClassVar[str] = ""  # the fine print under the ablation tables

    @abstractmethod
    def subjects(self, out: Path) -> list[TargetSubject]:
        """The subjects, in order. A target that makes its photos writes them under `out` (the
        sweep's folder), once: a rerun of the sweep finds them there. Bad input: ValueError."""

    def wrong_class(self, subject: TargetSubject) -> str:
        """A class noun that is wrong for `subject` (the wrong_class ablation)."""
        return next(w for w in WRONG_CLASSES if w != subject.class_word)

    @abstractmethod
    def load(self, device: str | None) -> Any:
        """The networks that measure (None: the target's default device). Called before any
        training, so that a missing weight file fails first (ValueError, OSError)."""

    @abstractmethod
    def evaluate(
        self, networks: Any, run: Path, subject: TargetSubject, device: str | None
    ) -> dict[str, float]:
        """The figures of `run`'s last.ckpt, a run trained on `subject` (NaN where one cannot be
        measured). It may write reports into the run folder; bad input or a failure of the
        environment is a ValueError or OSError with a one-line message."""


@dataclass(frozen=True)
class EvaluateScriptTarget(Target):
    """Subjects measured by scripts/evaluate.py as in the paper: DINO, CLIP-I, CLIP-T, PRES, DIV.
    `flags` are further evaluate.py flags (--n_samples 4, --dino_weights ...); the reports go to
    RUN/eval/last/<subject>/."""

    flags: tuple[str, ...] = ()

    metrics = METRICS
    subject_metrics = ("dino", "clip_i")
    headers = HEADERS
    paper = {"prior": PAPER_TABLE3, "class_noun": PAPER_TABLE4}
    notes = (
        "The paper's ablations were run with Imagen, over the 30 DreamBench subjects. CLIP-T "
        "embeds the prompts without the identifier. Per-run reports: "
        "OUT/runs/<subject>/<variant>/<run>/eval/last/<subject>/report.md."
    )
    # evaluate.py flags that the target sets for each run itself.
    OWN_FLAGS = ("ckpt", "config", "subject", "dreambench_root", "real_dir", "class_word", "outdir")

    def __post_init__(self) -> None:
        opt = self.options()
        taken = [f"--{f}" for f in self.OWN_FLAGS if getattr(opt, f) is not None]
        if taken:
            raise ValueError(f"the sweep sets {', '.join(taken)} for each run itself")

    def options(self, argv: Sequence[str] = ()) -> argparse.Namespace:
        """evaluate.py's options from `argv` and the target's flags; a bad flag: ValueError."""
        p = evaluate.parser()
        p.exit_on_error = False  # a wrong value raises argparse.ArgumentError
        try:
            opt, unknown = p.parse_known_args([*argv, *self.flags])
        except argparse.ArgumentError as e:
            raise ValueError(f"scripts/evaluate.py flags: {e}") from None
        if unknown:
            raise ValueError(f"unrecognised arguments: {' '.join(unknown)}")
        return opt

    @abstractmethod
    def subject_flags(self, subject: TargetSubject) -> list[str]:
        """The evaluate.py flags that name `subject`."""

    def load(self, device: str | None) -> Any:
        return evaluate.build_evaluator(self.options(), device)

    def evaluate(
        self, networks: Any, run: Path, subject: TargetSubject, device: str | None
    ) -> dict[str, float]:
        where = ["--device", device] if device else []
        opt = self.options(["--ckpt", str(run), *where, *self.subject_flags(subject)])
        evaluation = evaluate.resolve(opt)
        metrics, markdown = evaluate.evaluate(evaluation, opt, networks)
        print(f"{markdown}\n\nwritten to {evaluation.outdir}", flush=True)
        return metrics


@dataclass(frozen=True)
class DreamBenchTarget(EvaluateScriptTarget):
    """DreamBench subjects (`names`), their photos in `root/<name>`."""

    root: str = ""
    names: tuple[str, ...] = ()

    kind = "dreambench"

    def subjects(self, out: Path) -> list[TargetSubject]:
        found = [dreambench_subject(name, self.root) for name in self.names]
        return [TargetSubject(s.name, s.class_word, str(s.real_dir)) for s in found]

    def subject_flags(self, subject: TargetSubject) -> list[str]:
        return ["--subject", subject.name, "--dreambench_root", self.root]


@dataclass(frozen=True)
class PhotosTarget(EvaluateScriptTarget):
    """Your own subject: its photos in `real_dir`, of class `class_word`."""

    real_dir: str = ""
    class_word: str = ""

    kind = "photos"

    def subjects(self, out: Path) -> list[TargetSubject]:
        s = custom_subject(self.real_dir, self.class_word)
        return [TargetSubject(s.name, s.class_word, str(s.real_dir))]

    def subject_flags(self, subject: TargetSubject) -> list[str]:
        return ["--real_dir", self.real_dir, "--class_word", self.class_word]


TOY_SUBJECTS = tuple(toyworld.SUBJECTS)  # ball, box, cup


@dataclass(frozen=True)
class ToyTarget(Target):
    """The toy world's subjects (`names`: ball, box, cup; photos in data/toy/<name>), measured by
    its evaluator (ldm.eval.toy): `n_per_prompt` samples of "a photo of a sks <class> <context>"
    in each of the 5 contexts and `n_class` of "a photo of a <class>", DDIM `ddim_steps` steps
    at guidance `scale`. Base config of its runs: configs/dreambooth/demo.yaml."""

    names: tuple[str, ...] = TOY_SUBJECTS
    n_per_prompt: int = 8
    n_class: int = 32
    ddim_steps: int = 50
    scale: float = 5.0
    seed: int = 0

    kind = "toy"
    metrics = tuple(toy_runs.METRIC_HEADERS)
    subject_metrics = ("subject_rate", "subject_sim", "colour_rate", "class_acc")
    headers = toy_runs.METRIC_HEADERS
    notes = "Toy world (ldm.eval.toy). " + toy_runs.NOTES

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in TOY_SUBJECTS]
        if unknown or not self.names:
            raise ValueError(
                f"toy subjects: {', '.join(unknown) or 'none given'}: "
                f"choose from {', '.join(TOY_SUBJECTS)}"
            )
        if min(self.n_per_prompt, self.n_class, self.ddim_steps) < 1:
            raise ValueError("toy evaluation: n_per_prompt, n_class and ddim_steps must be >= 1")

    def subjects(self, out: Path) -> list[TargetSubject]:
        root = Path(__file__).resolve().parents[1] / "data" / "toy"
        return [
            TargetSubject(name, toyworld.SUBJECTS[name].cls, str(root / name))
            for name in self.names
        ]

    def wrong_class(self, subject: TargetSubject) -> str:
        """The next class of the world (ball -> box -> cup -> ball): a noun the base knows."""
        return TOY_SUBJECTS[(TOY_SUBJECTS.index(subject.class_word) + 1) % len(TOY_SUBJECTS)]

    def load(self, device: str | None) -> Any:
        return load_toy_evaluator()  # it and the toy models run on the CPU: 64 px images

    def evaluate(
        self, networks: Any, run: Path, subject: TargetSubject, device: str | None
    ) -> dict[str, float]:
        settings = {k: getattr(self, k) for k in toy_runs.SETTINGS}
        figures = toy_runs.evaluate_run(run, networks, subject.name, **settings)
        print(toy_runs.markdown(f"{run.name}: {subject.name}", figures), flush=True)
        return figures


TARGETS: dict[str, type[Target]] = {t.kind: t for t in (DreamBenchTarget, PhotosTarget, ToyTarget)}


TARGET_FLAGS = ("subjects", "dreambench_root", "real_dir", "class_word", "toy_subjects")  # parsed


def add_target_arguments(p: argparse.ArgumentParser, several: bool) -> None:
    """The flags that name a target: DreamBench subjects (`several`: --subjects a,b, else
    --subject a) with --dreambench_root, or your own photos with --real_dir and --class_word."""
    if several:
        p.add_argument("--subjects", help="DreamBench subjects, comma-separated, e.g. dog,backpack")
    else:
        p.add_argument("--subject", dest="subjects", help="a DreamBench subject, e.g. dog")
    p.add_argument("--dreambench_root", help="the folder of DreamBench subject folders")
    p.add_argument("--real_dir", help="or your own subject's photos (with --class_word)")
    p.add_argument("--class_word", help="your subject's class noun, e.g. dog")
    p.add_argument(
        "--toy_subjects" if several else "--toy_subject",
        dest="toy_subjects",
        help="or the toy world's subjects, comma-separated: " + ",".join(TOY_SUBJECTS),
    )


def names_target(opt: argparse.Namespace) -> bool:
    """Whether any flag of `add_target_arguments` was given."""
    return any(getattr(opt, f) is not None for f in TARGET_FLAGS)


def target_of(opt: argparse.Namespace, flags: Sequence[str]) -> Target:
    """The target the flags of `add_target_arguments` name; `flags` are further evaluate.py
    flags. Another kind of target gets its flags here."""
    flags = tuple(flags)
    if getattr(opt, "toy_subjects", None):
        if opt.subjects or opt.real_dir:
            raise ValueError("pass toy subjects, DreamBench subjects or --real_dir, one of them")
        names = tuple(s for s in opt.toy_subjects.split(",") if s)
        return ToyTarget(names, **toy_runs.settings_from_flags(flags))
    if opt.subjects and opt.real_dir:
        raise ValueError("pass DreamBench subjects or --real_dir, not both")
    if opt.subjects:
        if not opt.dreambench_root:
            raise ValueError("DreamBench subjects need --dreambench_root, the folder of subjects")
        names = tuple(s for s in opt.subjects.split(",") if s)
        return DreamBenchTarget(flags, root=opt.dreambench_root, names=names)
    if opt.real_dir and opt.class_word:
        return PhotosTarget(flags, real_dir=opt.real_dir, class_word=opt.class_word)
    raise ValueError("name the subjects: DreamBench ones with --dreambench_root, or --real_dir "
                     "with --class_word")  # fmt: skip


def _tuples(value: Any) -> Any:
    """JSON's lists back as the tuples a frozen dataclass holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def to_json(item: Target | TargetSubject) -> dict[str, Any]:
    """A target (with its kind) or a subject as JSON-ready data."""
    data = asdict(item)
    return {"kind": item.kind, **data} if isinstance(item, Target) else data


def from_json(data: Mapping[str, Any] | None) -> Any:
    """What `to_json` wrote, as a Target or a TargetSubject."""
    if data is None:
        return None
    data = dict(data)
    cls = TARGETS[data.pop("kind")] if "kind" in data else TargetSubject
    return cls(**{f.name: _tuples(data[f.name]) for f in fields(cls) if f.name in data})
