"""DreamBooth data: which files are read, how every image mode becomes RGB, errors, augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from torch.utils.data import DataLoader

from ldm.data.dreambooth import DreamBoothDataset, collate, format_prompt
from ldm.data.images import DataError, check_image_folder, list_images, load_rgb

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "dog"


def halves(left: tuple, right: tuple, size: tuple[int, int] = (8, 4), mode: str = "RGB"):
    """An image whose left half is `left` and right half is `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def rgb(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)[y, x]


def as_rgb(pixels: torch.Tensor) -> np.ndarray:
    """A [3, H, W] tensor in [-1, 1] as an [H, W, 3] array of 0..255 values."""
    return ((pixels + 1) * 127.5).permute(1, 2, 0).numpy()


def folder_of(tmp_path: Path, name: str, colors: list[tuple], size=(8, 8)) -> Path:
    for i, color in enumerate(colors):
        save(Image.new("RGB", size, color), tmp_path / name / f"{i:03d}.png")
    return tmp_path / name


def test_list_images_reads_only_image_files_sorted_by_name(tmp_path):
    for name in ["b.png", "a.PNG", "c.JPG", "d.webp", "e.tiff"]:
        save(Image.new("RGB", (4, 4)), tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble fork")
    (tmp_path / "notes.txt").write_text("not an image")
    save(Image.new("RGB", (4, 4)), tmp_path / "sub" / "inner.png")
    (tmp_path / "folder.jpg").mkdir()

    expected = ["a.PNG", "b.png", "c.JPG", "d.webp", "e.tiff"]
    assert [p.name for p in list_images(tmp_path)] == expected
    assert [p.name for p in check_image_folder(tmp_path)] == expected


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display after turning 90 degrees clockwise
    path = save(halves(RED, BLUE, size=(40, 20)), tmp_path / "rotated.jpg", exif=exif, quality=95)

    image = load_rgb(path)
    assert image.size == (20, 40)
    # Turning clockwise moves the stored left (red) half to the top.
    assert np.abs(rgb(image, 10, 5) - RED).max() < 10
    assert np.abs(rgb(image, 10, 35) - BLUE).max() < 10


def palette_with_transparency() -> Image.Image:
    image = halves(0, 1, mode="P")
    image.putpalette([0, 0, 0, 0, 0, 255])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("image", "opaque"),
    [
        (halves((0, 0, 0, 0), (0, 0, 255, 255), mode="RGBA"), BLUE),
        (halves((0, 0), (50, 255), mode="LA"), (50, 50, 50)),
        (palette_with_transparency(), BLUE),
    ],
    ids=["RGBA", "LA", "P"],
)
def test_transparent_pixels_become_white(tmp_path, image, opaque):
    path = save(image, tmp_path / "alpha.png", **({"transparency": 0} if image.mode == "P" else {}))
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert tuple(rgb(loaded, 0, 0)) == WHITE
    assert tuple(rgb(loaded, 7, 0)) == opaque


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    path = save(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), tmp_path / "half.png")
    assert np.abs(rgb(load_rgb(path), 0, 0) - 127).max() <= 1


@pytest.mark.parametrize(("suffix", "dtype"), [(".png", np.uint16), (".tif", np.int32)])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, suffix, dtype):
    values = np.array([[65535, 32768, 0, 4112]], dtype=dtype)
    path = save(Image.fromarray(values), tmp_path / f"deep{suffix}")
    # Pillow before 10.1 opens a 16-bit PNG as "I", later ones as "I;16": both are 16-bit here.
    assert Image.open(path).mode in (("I;16", "I") if dtype == np.uint16 else ("I",))

    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert [tuple(rgb(loaded, x, 0)) for x in range(4)] == [
        (255, 255, 255),
        (128, 128, 128),
        (0, 0, 0),
        (16, 16, 16),
    ]


def srgb_to_lab(image: Image.Image) -> Image.Image:
    srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    return ImageCms.applyTransform(image, ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))


@pytest.mark.parametrize(
    ("image", "suffix", "expected"),
    [
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), ".jpg", RED),
        (Image.new("L", (8, 8), 100), ".png", (100, 100, 100)),
        (Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4), ".png", (10, 200, 30)),
        (Image.new("1", (8, 8), 1), ".bmp", WHITE),
        (Image.new("RGB", (8, 8), (10, 200, 30)).convert("YCbCr"), ".tif", (10, 200, 30)),
        (srgb_to_lab(Image.new("RGB", (8, 8), (10, 200, 30))), ".tif", (10, 200, 30)),
    ],
    ids=["CMYK", "L", "P", "1", "YCbCr", "LAB"],
)
def test_other_modes_are_converted_to_rgb(tmp_path, image, suffix, expected):
    path = save(image, tmp_path / f"mode{suffix}")
    if image.mode == "YCbCr" and Image.open(path).mode == "RGB":
        pytest.skip("Pillow 10.x writes a YCbCr TIFF that reads back as RGB")
    assert Image.open(path).mode == image.mode
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    # JPEG and 8-bit LAB round trips move a channel by up to ~10 levels.
    assert np.abs(rgb(loaded, 4, 4) - expected).max() <= 12


def truncated_jpeg(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    save(Image.fromarray(noise), path)
    path.write_bytes(path.read_bytes()[:600])
    return path


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_stops_validation_with_one_line_naming_it(tmp_path, kind):
    save(Image.new("RGB", (8, 8)), tmp_path / "images" / "good.png")
    bad = tmp_path / "images" / "bad.jpg"
    if kind == "garbage":
        bad.write_bytes(b"this is not a jpeg")
    else:
        truncated_jpeg(bad)

    with pytest.raises(DataError) as error:
        check_image_folder(tmp_path / "images")
    message = str(error.value)
    assert str(bad) in message and "good.png" not in message
    assert "\n" not in message
    with pytest.raises(DataError, match="bad.jpg"):
        DreamBoothDataset(tmp_path / "images", "sks", "dog", size=8)


def test_empty_and_missing_folders_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files") as error:
        check_image_folder(empty)
    assert str(empty) in str(error.value)

    missing = tmp_path / "missing"
    with pytest.raises(DataError, match="does not exist") as error:
        DreamBoothDataset(folder_of(tmp_path, "inst", [RED]), "sks", "dog", class_root=missing)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize(("color", "value"), [(WHITE, 1.0), ((0, 0, 0), -1.0)])
def test_items_are_float_images_in_minus_one_to_one(tmp_path, color, value):
    dataset = DreamBoothDataset(folder_of(tmp_path, "i", [color], (30, 20)), "sks", "dog", size=16)
    pixels = dataset[0]["instance_image"]
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert torch.all(pixels == value)

    noise = np.random.default_rng(0).integers(0, 256, (50, 37, 3), dtype=np.uint8)
    save(Image.fromarray(noise), tmp_path / "noise" / "n.png")
    pixels = DreamBoothDataset(tmp_path / "noise", "sks", "dog", size=16)[0]["instance_image"]
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.std() > 0.2


@pytest.mark.parametrize("landscape", [True, False])
def test_center_crop_keeps_the_center(tmp_path, landscape):
    stripes = Image.new("RGB", (60, 20), RED)
    stripes.paste(GREEN, (20, 0, 40, 20))
    stripes.paste(BLUE, (40, 0, 60, 20))
    if not landscape:
        stripes = stripes.transpose(Image.Transpose.ROTATE_90)
    save(stripes, tmp_path / "i" / "stripes.png")

    dataset = DreamBoothDataset(tmp_path / "i", "sks", "dog", size=10, flip_p=0.0)
    pixels = as_rgb(dataset[0]["instance_image"])
    # Bicubic resizing blurs a pixel or two into the crop at the stripe borders.
    assert np.abs(pixels[2:8, 2:8] - GREEN).max() < 2
    assert pixels[..., 1].mean() > 200


@pytest.mark.parametrize(("flip_p", "left"), [(1.0, BLUE), (0.0, RED)])
def test_flip_probability(tmp_path, flip_p, left):
    save(halves(RED, BLUE, size=(16, 16)), tmp_path / "i" / "halves.png")
    dataset = DreamBoothDataset(tmp_path / "i", "sks", "dog", size=16, flip_p=flip_p)
    for epoch in range(5):
        dataset.set_epoch(epoch)
        pixels = as_rgb(dataset[0]["instance_image"])
        assert np.abs(pixels[8, 2] - left).max() < 1


def test_items_are_a_function_of_seed_epoch_and_index(tmp_path):
    colors = [(i, 255 - i, 0) for i in range(64)]
    save(halves(RED, BLUE, size=(8, 8)), tmp_path / "inst" / "halves.png")
    classes = folder_of(tmp_path, "class", colors)

    def flips(seed: int, epoch: int, order) -> dict[int, bool]:
        dataset = DreamBoothDataset(
            tmp_path / "inst", "sks", "dog", 8, class_root=classes, seed=seed
        )
        dataset.set_epoch(epoch)
        torch.manual_seed(1000 + epoch)  # global RNG must not matter
        return {i: bool(as_rgb(dataset[i]["instance_image"])[4, 0, 2] > 128) for i in order}

    epoch0 = flips(7, 0, range(64))
    assert flips(7, 0, reversed(range(64))) == epoch0
    epoch1 = flips(7, 1, range(64))
    assert epoch1 == flips(7, 1, range(64))
    changed = sum(epoch0[i] != epoch1[i] for i in range(64))
    assert 16 <= changed <= 48  # independent fair coins: about half change
    assert 16 <= sum(epoch0.values()) <= 48
    assert flips(8, 0, range(64)) != epoch0


def test_random_crop_varies_and_repeats(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (16, 64, 3), dtype=np.uint8)
    for i in range(8):  # one image eight times: any difference between items is the crop
        save(Image.fromarray(noise), tmp_path / "i" / f"wide{i}.png")
    dataset = DreamBoothDataset(
        tmp_path / "i", "sks", "dog", size=16, center_crop=False, flip_p=0.0, seed=1
    )
    crops = [dataset[i]["instance_image"] for i in range(8)]
    assert all(torch.equal(crop, dataset[i]["instance_image"]) for i, crop in enumerate(crops))
    assert len({crop.sum().item() for crop in crops}) > 4
    with pytest.raises(ValueError, match="random crop"):
        dataset.instance_pixels(0, flip=False)


def test_length_and_wrap_around_with_class_images(tmp_path):
    instances = folder_of(tmp_path, "inst", [RED, BLUE])
    grays = [(g, g, g) for g in (0, 50, 100, 150, 200)]
    classes = folder_of(tmp_path, "class", grays)

    dataset = DreamBoothDataset(instances, "sks", "dog", 8, class_root=classes, flip_p=0.0)
    assert len(dataset) == 5
    for i in range(5):
        item = dataset[i]
        assert np.abs(as_rgb(item["instance_image"])[0, 0] - [RED, BLUE][i % 2]).max() < 1
        assert np.abs(as_rgb(item["class_image"])[0, 0] - grays[i]).max() < 1
        assert (item["instance_prompt"], item["class_prompt"]) == (
            "a photo of sks dog",
            "a photo of dog",
        )
    with pytest.raises(IndexError):
        dataset[5]

    alone = DreamBoothDataset(instances, "sks", "dog", 8)
    assert len(alone) == 2 and set(alone[1]) == {"instance_image", "instance_prompt"}
    more_instances = DreamBoothDataset(classes, "sks", "dog", 8, class_root=instances, flip_p=0.0)
    assert len(more_instances) == 5
    assert np.abs(as_rgb(more_instances[4]["class_image"])[0, 0] - RED).max() < 1


def test_prompt_templates(tmp_path):
    assert format_prompt("a photo of {token} {class}", "sks", "dog") == "a photo of sks dog"
    assert format_prompt("{class}, by {token}!", "zwx", "cat") == "cat, by zwx!"
    for template, field in [("a {tokn} {class}", "tokn"), ("a photo of {}", "{}"), ("{0}", "0")]:
        with pytest.raises(DataError, match="unknown field") as error:
            format_prompt(template, "sks", "dog")
        assert field in str(error.value)
    with pytest.raises(DataError, match="photo of"):
        format_prompt("a photo of {token", "sks", "dog")

    dataset = DreamBoothDataset(
        folder_of(tmp_path, "inst", [RED]),
        "sks",
        "dog",
        8,
        instance_template="{token} {class} on a beach",
        class_root=folder_of(tmp_path, "class", [BLUE]),
        class_template="{class} on a beach",
    )
    assert (dataset[0]["instance_prompt"], dataset[0]["class_prompt"]) == (
        "sks dog on a beach",
        "dog on a beach",
    )
    with pytest.raises(DataError, match="species"):
        DreamBoothDataset(tmp_path / "inst", "sks", "dog", 8, instance_template="{species}")


def test_collate_batches_images_and_prompts(tmp_path):
    instances = folder_of(tmp_path, "inst", [RED, BLUE, GREEN])
    classes = folder_of(tmp_path, "class", [WHITE, RED])
    with_prior = DreamBoothDataset(instances, "sks", "dog", 8, class_root=classes)
    batch = next(iter(DataLoader(with_prior, batch_size=3, collate_fn=collate)))
    assert batch["instance_images"].shape == batch["class_images"].shape == (3, 3, 8, 8)
    assert batch["instance_prompts"] == ["a photo of sks dog"] * 3
    assert batch["class_prompts"] == ["a photo of dog"] * 3
    assert torch.equal(batch["class_images"][2], with_prior[2]["class_image"])

    alone = DreamBoothDataset(instances, "sks", "dog", 8)
    assert set(collate([alone[0], alone[1]])) == {"instance_images", "instance_prompts"}


def test_fixed_pixels_are_what_items_contain(tmp_path):
    save(halves(RED, BLUE, size=(12, 8)), tmp_path / "inst" / "a.png")
    save(halves(GREEN, WHITE, size=(8, 12)), tmp_path / "inst" / "b.png")
    classes = folder_of(tmp_path, "class", [(30, 60, 90), (90, 60, 30), (0, 0, 0)])
    dataset = DreamBoothDataset(tmp_path / "inst", "sks", "dog", 8, class_root=classes, seed=3)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            plan, item = dataset.plan(i), dataset[i]
            expected = dataset.instance_pixels(plan.instance_index, plan.instance_flip)
            assert torch.equal(item["instance_image"], expected)
            expected = dataset.class_pixels(plan.class_index, plan.class_flip)
            assert torch.equal(item["class_image"], expected)
    assert not torch.equal(dataset.instance_pixels(0, True), dataset.instance_pixels(0, False))


def test_demo_subject_is_bundled():
    paths = check_image_folder(DEMO)
    assert [p.name for p in paths] == [f"{i:02d}.jpg" for i in range(5)]
    assert all(load_rgb(p).size == (128, 128) for p in paths)
    assert (DEMO.parent / "ATTRIBUTION.md").is_file()
