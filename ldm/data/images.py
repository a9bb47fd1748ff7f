"""Reading photos from disk: which files count as images, and how any of them becomes RGB.

Everything in the project that reads photos (DreamBooth data, prior-image sampling, evaluation) goes
through `list_images` and `load_rgb`, so they all agree on what an image is and how it looks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# The decoders those extensions need. A file is decoded by its content, whatever its name, so
# anything else (an EPS named 00.jpg would go to Ghostscript) is refused before a decoder runs.
# (Phones' multi-picture JPEGs open through the JPEG decoder, as MPO.)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# Pixels a photo may have (checked from its header, before decoding): 64 Mpx covers 61 Mpx
# cameras, and keeps one decoded image under about 1 GB through the conversions below, far
# below Pillow's own limit (a warning at 89 Mpx, an error at 179 Mpx).
MAX_IMAGE_PIXELS = 64_000_000

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
# Pillow opens 16-bit grayscale as I;16*, and some older files and writers as 32-bit "I".
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What a decoder can raise on a broken or unsupported file; anything else is a bug, not bad data.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # raised as an error in load_rgb
)


class DataError(ValueError):
    """Training data (or a file in a folder the code writes to) that can't be used. The message is
    one line: the file or folder, then why."""

    def __init__(self, where: str | Path, reason: object) -> None:
        # Decoder messages sometimes span lines; the user should see exactly one.
        text = " ".join(str(reason).split()) or type(reason).__name__
        super().__init__(f"{where}: {text}")
        self.where = str(where)


def _is_image_file(path: Path) -> bool:
    # Hidden files include macOS "._name.jpg" resource forks, which carry an image extension.
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name; other files and subfolders are skipped.

    An empty list means no images; a missing folder is a DataError.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(folder, "folder does not exist")
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    return sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` fully, apply its EXIF orientation and convert it to 8-bit RGB.

    Transparent pixels become white, 16-bit grayscale is scaled (not clipped) to 8 bits, and
    CMYK, LAB, palette, 1-bit and grayscale images are converted. Raises DataError naming the file if
    it can't be read, is not one of IMAGE_FORMATS, or has more than MAX_IMAGE_PIXELS pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                _check_pixels(image)
                image.load()  # open() reads only the header; truncation shows when decoding
                return _to_rgb(ImageOps.exif_transpose(image))
    except Image.UnidentifiedImageError as exc:
        raise DataError(path, f"not a {', '.join(IMAGE_FORMATS)} image ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise DataError(path, exc) from exc


def _check_pixels(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{width} x {height} pixels is over the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels "
            "(ldm.data.images.MAX_IMAGE_PIXELS); refused before decoding: downscale the photo"
        )


class ImageFiles(Sequence):
    """Image files that decode when indexed (`load_rgb`), so a folder of large photos is never
    held decoded all at once; a slice decodes only its own images."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [load_rgb(p) for p in self.paths[index]]
        return load_rgb(self.paths[index])


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no defined range; save as 8 or 16 bit")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent pixels often hold black or junk colour; show them as a white background.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # convert("L") would clip at 255, turning every 16-bit value above 255 into white.
    pixels = np.asarray(image)  # uint16 for I;16*, int32 for I: integers, never a float copy
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ValueError(f"{image.mode} pixels outside the 16-bit range 0..65535")
    # round(p / 257) in integers (p / 257 is never exactly half-way); 65535 / 257 == 255, so
    # full scale maps to full scale.
    scaled = pixels.astype(np.int32)
    scaled += 128
    scaled //= 257
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def check_image_folder(folder: str | Path) -> list[Path]:
    """List the images in `folder` and decode every one, so bad data stops a run before training.

    Returns the sorted paths. Raises DataError (one line naming the folder or file) if the folder is
    missing, holds no images, or any image can't be read.
    """
    paths = list_images(folder)
    if not paths:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(folder, f"no image files ({extensions})")
    for path in paths:
        load_rgb(path)
    return paths


def resize_crop(
    image: Image.Image, size: int, crop: tuple[float, float] | None = None
) -> Image.Image:
    """Resize the shorter side to `size` (bicubic, antialiased) and cut a `size` x `size` square.

    `crop` is None for the center, or (x, y) in [0, 1) choosing the offset along each axis uniformly
    among the possible ones.
    """
    width, height = image.size
    scale = size / min(width, height)
    # max() guards the shorter side against rounding a hair below `size`.
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = new_size
    if crop is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = int(crop[0] * (width - size + 1)), int(crop[1] * (height - size + 1))
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor [3, H, W] in [-1, 1], the range the autoencoder expects."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3]
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)
