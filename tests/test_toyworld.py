"""The toy world: its renderer and captions, and the captioned training data built on it."""

import numpy as np
import pytest
import torch

from ldm.data import toyworld as tw
from ldm.data.dreambooth import DreamBoothDataset
from ldm.data.images import DataError
from ldm.train.batches import PositionDataset


def pixels(scene: tw.Scene) -> np.ndarray:
    return np.asarray(tw.render(scene), dtype=np.int16)


def test_scenes_and_renders_are_a_function_of_seed_and_index():
    assert tw.scene(3, 7) == tw.scene(3, 7)
    assert np.array_equal(pixels(tw.scene(3, 7)), pixels(tw.scene(3, 7)))
    assert tw.scene(3, 7) != tw.scene(3, 8) and tw.scene(3, 7) != tw.scene(4, 7)
    image = tw.render(tw.scene(0, 0))
    assert image.size == (64, 64) and image.mode == "RGB"


def test_every_class_colour_and_context_occurs():
    scenes = [tw.scene(0, i) for i in range(300)]
    assert {s.cls for s in scenes} == set(tw.CLASSES)
    assert {s.colour for s in scenes} == set(tw.COLOURS)
    assert {s.context for s in scenes} == set(tw.CONTEXTS)
    assert all(s.subject is None and s.look is None for s in scenes)


def test_a_subject_differs_from_a_plain_object_only_on_the_object():
    for name, spec in tw.SUBJECTS.items():
        subject = tw.scene(1, 0, subject=name, context="grass")
        assert (subject.cls, subject.colour) == (spec.cls, None)
        # The same scene with a plain red object: the background is the same pixel for pixel.
        plain = tw.Scene(**{**subject.__dict__, "subject": None, "colour": "red"})
        changed = np.abs(pixels(subject) - pixels(plain)).sum(-1) > 30  # [64, 64]
        rows, columns = np.nonzero(changed)
        assert changed.sum() > 20
        reach = 2.6 * subject.size + 3  # the object's extent around its centre and ground
        assert np.all(np.abs(columns - subject.x) <= reach)
        assert np.all(rows <= subject.ground + 3) and np.all(rows >= subject.ground - reach)


def test_captions_name_class_and_the_details_they_keep():
    s = tw.scene(0, 5)
    assert tw.full_caption(s) == f"a photo of a {s.colour} {s.cls} {tw.CONTEXTS[s.context]}"
    rng = np.random.default_rng(0)
    captions = [tw.caption(s, rng) for _ in range(200)]
    assert all(c.startswith("a photo of a") and s.cls in c for c in captions)
    without_context = sum(tw.CONTEXTS[s.context] not in c for c in captions) / len(captions)
    assert 0.2 < without_context < 0.4  # p_context = 0.3
    with pytest.raises(ValueError, match="subject"):
        tw.caption(tw.scene(0, 0, subject="ball"), rng)


def test_written_world_is_a_captioned_dataset(tmp_path):
    tw.write_world(tmp_path / "world", 6, seed=2)
    dataset = DreamBoothDataset(tmp_path / "world", "sks", None, size=64, captions=True)
    assert len(dataset) == 6 and dataset.instance_prompt is None
    for i in range(6):
        text = (tmp_path / "world" / f"{i:05d}.txt").read_text().strip()
        assert dataset.prompts[dataset.instance_prompt_ids[i]] == text
        assert dataset[i]["instance_prompt"] in (text,)  # item i is image i (no class folder)
    assert dataset.prompts[dataset.empty_prompt_id] == ""


def test_a_missing_caption_is_named(tmp_path):
    tw.write_world(tmp_path / "world", 2, seed=0)
    (tmp_path / "world" / "00001.txt").unlink()
    with pytest.raises(DataError, match="00001.png.*no caption file 00001.txt"):
        DreamBoothDataset(tmp_path / "world", "sks", None, size=64, captions=True)


def test_caption_dropout_is_keyed_by_position(tmp_path):
    tw.write_world(tmp_path / "world", 4, seed=0)
    dataset = DreamBoothDataset(tmp_path / "world", "sks", None, size=64, captions=True)

    def prompts(p: float) -> list[int]:
        positions = PositionDataset(dataset, 5, (4, 8, 8), 1000, caption_dropout=p)
        return [int(positions[i]["instance_prompt"]) for i in range(400)]

    dropped = prompts(0.25)
    assert dropped == prompts(0.25)  # the same draw for the same position
    empty = sum(p == dataset.empty_prompt_id for p in dropped) / len(dropped)
    assert 0.18 < empty < 0.32
    kept = prompts(0.0)
    assert dataset.empty_prompt_id not in kept
    # Dropout draws from its own stream: the timesteps and noise do not move.
    a = PositionDataset(dataset, 5, (4, 8, 8), 1000, caption_dropout=0.25)[3]
    b = PositionDataset(dataset, 5, (4, 8, 8), 1000)[3]
    assert torch.equal(a["instance_t"], b["instance_t"])
    assert torch.equal(a["instance_noise"], b["instance_noise"])


def test_noise_offset_shifts_each_channel_and_keeps_the_other_draws(tmp_path):
    tw.write_world(tmp_path / "world", 4, seed=0)
    dataset = DreamBoothDataset(tmp_path / "world", "sks", None, size=64, captions=True)
    plain = PositionDataset(dataset, 5, (4, 8, 8), 1000)[3]
    offset = PositionDataset(dataset, 5, (4, 8, 8), 1000, noise_offset=0.1)[3]
    shift = offset["instance_noise"] - plain["instance_noise"]  # [4, 8, 8]
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6)
    assert 0 < shift[:, 0, 0].abs().max() < 0.5
    for key in ("instance_t", "instance_eps", "instance_prompt"):
        assert torch.equal(offset[key], plain[key])


def test_timesteps_are_uniform_over_the_whole_schedule(tmp_path):
    """The short DreamBooth test (test_toy_dreambooth.py) still passes when only small timesteps
    are trained (the colour it reads is set late in sampling), so the range is checked here."""
    tw.write_world(tmp_path / "world", 4, seed=0)
    dataset = DreamBoothDataset(tmp_path / "world", "sks", None, size=64, captions=True)
    positions = PositionDataset(dataset, 5, (4, 8, 8), 1000)
    t = torch.stack([positions[i]["instance_t"] for i in range(3000)]).float()
    assert t.min() < 10 and t.max() > 990
    assert abs(t.mean().item() - 499.5) < 20 and abs(t.std().item() - 288.7) < 15
