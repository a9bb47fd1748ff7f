"""Files from other people take memory in proportion to their size: image bombs are refused from
their header, malformed .safetensors files by the format's rules (one line naming the tensor),
and .ckpt zip bombs and expanded tensors before anything grows. Each file is built here."""

import json
import struct
import tracemalloc
import weakref
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import ldm.data.images
from ldm.checkpoint import (
    CheckpointError,
    load_model_from_config,
    read_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from ldm.data import toyworld as tw
from ldm.data.dreambooth import MAX_CAPTION_BYTES, DreamBoothDataset
from ldm.data.images import MAX_IMAGE_PIXELS, DataError, ImageFiles, load_rgb
from ldm.eval.clip import load_clip
from ldm.eval.metrics import embed_images
from ldm.eval.weights import load_state_dict_file

from .conftest import CONFIGS, load_script, tiny_config
from .test_security import DOG_PHOTOS, one_line_error

export = load_script("export")
txt2img = load_script("stable_txt2img")


# --- 8: image bombs ----------------------------------------------------------------------------


def zeros_png(path: Path, size: int, bit_depth: int, color_type: int, channels: int) -> Path:
    """A PNG of size x size black pixels that is a few hundred KB on disk: the zlib stream of
    zeros is one full-flushed block of rows, repeated (a flush resets the compressor)."""
    row = 1 + size * channels * bit_depth // 8  # a filter byte, then the pixels
    rows = next(r for r in range(100, 0, -1) if size % r == 0)
    c = zlib.compressobj(9)
    block = c.compress(bytes(row * rows)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(row * rows)) + c.flush(zlib.Z_FULL_FLUSH)
    adler = (row * size % 65521) << 16 | 1  # adler32 of that many zeros
    idat = block + again[2:] * (size // rows - 1) + b"\x03\x00" + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", size, size, bit_depth, color_type, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(
        signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    ("name", "size", "bit_depth", "color_type", "channels", "reason"),
    [
        ("grey16.png", 9500, 16, 0, 1, "decompression bomb"),  # 90 Mpx, over Pillow's warning
        ("rgba.png", 13370, 8, 6, 4, "decompression bomb"),  # 179 Mpx, under Pillow's error
        ("rgb.png", 8200, 8, 2, 3, "megapixels"),  # 67 Mpx, under Pillow's warning
    ],
)
def test_image_bombs_are_refused_before_decoding(
    tmp_path, monkeypatch, name, size, bit_depth, color_type, channels, reason
):
    path = zeros_png(tmp_path / name, size, bit_depth, color_type, channels)
    assert path.stat().st_size < 1_000_000 and size * size > MAX_IMAGE_PIXELS
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image))
    with pytest.raises(DataError, match=f"{name}: .*{reason}") as info:
        load_rgb(path)
    assert "\n" not in str(info.value) and not decoded


def test_16_bit_pixels_convert_in_integers(tmp_path):
    every_value = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(every_value).save(tmp_path / "all.png")
    grey = np.asarray(load_rgb(tmp_path / "all.png"))[..., 0]
    assert np.array_equal(grey, np.rint(every_value / 257).astype(np.uint8))
    big = np.random.default_rng(0).integers(0, 65536, (2000, 2000), dtype=np.uint16)
    Image.fromarray(big).save(tmp_path / "big.png")
    tracemalloc.start()
    try:
        load_rgb(tmp_path / "big.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * big.size  # a float64 copy alone is 8 bytes a pixel, with its temporaries 24


def test_photos_for_evaluation_are_decoded_a_batch_at_a_time(monkeypatch):
    alive, most = [0], []

    def load(path):
        image = load_rgb(path)
        alive[0] += 1
        weakref.finalize(image, lambda: alive.__setitem__(0, alive[0] - 1))
        return image

    def transform(image):
        most.append(alive[0])
        return torch.zeros(3)

    monkeypatch.setattr(ldm.data.images, "load_rgb", load)
    photos = ImageFiles(sorted(DOG_PHOTOS.glob("*.jpg")) * 2)
    out = embed_images(torch.nn.Linear(3, 2), photos, transform, batch_size=3)
    assert out.shape == (10, 2) and max(most) <= 3  # a list of decoded photos would hold 10


# --- 6 and 7: checkpoints --------------------------------------------------------------------


def safetensors_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def entry(shape: list, begin: int, end: int, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED_SAFETENSORS = {
    # A tensor declared larger than its bytes: the rest would be uninitialised memory.
    "short": ({"w": entry([1000], 0, 4)}, bytes(4), "'w' holds 4 bytes but its shape"),
    # 127 bytes that declare 2 GiB.
    "huge": ({"w": entry([2**29], 0, 2**31)}, b"", r"truncated \(tensor 'w' ends past"),
    # A negative offset would read the header as tensor data.
    "negative": ({"w": entry([2], -8, 0)}, bytes(8), "'w' has malformed data_offsets"),
    "overlap": ({"a": entry([1], 0, 4), "b": entry([1], 0, 4)}, bytes(4), "'b' starts at byte 0"),
    "gap": ({"a": entry([1], 4, 8)}, bytes(8), "'a' starts at byte 4 of the data, expected 0"),
    "shape": ({"w": entry([2, -1], 0, 8)}, bytes(8), "'w' has a malformed shape"),
    "dtype": ({"w": entry([1], 0, 4, "F8_E4M3")}, bytes(4), "'w' has unsupported dtype"),
    "trailing": ({"w": entry([1], 0, 4)}, bytes(8), "4 bytes after the last tensor"),
    "values": ({"w": entry([0] * 1_100_000, 0, 0)}, b"", "header has over 1000000 values"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_are_refused_naming_the_tensor(tmp_path, case):
    header, data, message = MALFORMED_SAFETENSORS[case]
    path = safetensors_file(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: .*{message}") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)


def test_safetensors_header_bounds(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes((100_000_001).to_bytes(8, "little") + b"{" + bytes(16))
    with pytest.raises(CheckpointError, match="big.safetensors: not a safetensors file"):
        read_checkpoint(path)
    path.write_bytes((2**20).to_bytes(8, "little") + b"{}")  # longer than the file
    with pytest.raises(CheckpointError, match="header of 1048576 bytes in a file of 10"):
        read_checkpoint(path)
    path.write_bytes((4).to_bytes(8, "little") + b"[[[[" + b"")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint(path)


def test_malformed_files_stop_txt2img_and_export_in_one_line(tmp_path, capsys):
    short = safetensors_file(tmp_path / "short.safetensors", *MALFORMED_SAFETENSORS["short"][:2])
    huge = safetensors_file(tmp_path / "huge.safetensors", *MALFORMED_SAFETENSORS["huge"][:2])
    argv = ["--ckpt", str(short), "--config", str(CONFIGS / "stable-diffusion" / "v1-tiny.yaml")]
    assert txt2img.main([*argv, "--outdir", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert "short.safetensors: tensor 'w' holds 4 bytes" in one_line_error(capsys)
    out = tmp_path / "out.safetensors"
    assert export.main(["--ckpt", str(huge), "--out", str(out), "--config", argv[-1]]) == 1
    assert "huge.safetensors: truncated (tensor 'w'" in one_line_error(capsys)
    assert not out.exists()


def deflated(path: Path, member: str = "data.pkl") -> Path:
    """`path` rewritten with `member` deflated, as torch.save never writes it."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for info, data in entries:
            stored = not info.filename.endswith(member)
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            target.writestr(info, data)
    return path


def test_checkpoint_bombs_are_refused_before_they_grow(tmp_path, capsys):
    # A pickle that inflates 200-fold: 64 MB of text in a file of a few hundred KB.
    zipped = tmp_path / "zipped.ckpt"
    save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "note": "0" * 2**26}, zipped)
    assert deflated(zipped).stat().st_size < 2**20
    with pytest.raises(CheckpointError, match=r"zipped.ckpt: zip entry '.*data.pkl' is compressed"):
        read_checkpoint(zipped)
    # One float, expanded with stride 0 to 2 GiB: .contiguous() (export) would allocate it all.
    expanded = tmp_path / "expanded.ckpt"
    save_checkpoint({"state_dict": {"w": torch.zeros(1).expand(2**29)}}, expanded)
    assert expanded.stat().st_size < 10_000
    out = tmp_path / "out.safetensors"
    config = str(CONFIGS / "stable-diffusion" / "v1-tiny.yaml")
    assert export.main(["--ckpt", str(expanded), "--out", str(out), "--config", config]) == 1
    message = "expanded.ckpt: tensor ['state_dict']['w'] has 536870912 elements but its storage"
    assert message in one_line_error(capsys) and not out.exists()
    # One 4 MB storage under 100 names: 400 MB for whoever copies each entry.
    shared = tmp_path / "shared.ckpt"
    one = torch.zeros(2**20)
    save_checkpoint({"state_dict": {f"w{i}": one for i in range(100)}}, shared)
    with pytest.raises(CheckpointError, match="shared.ckpt: its tensors add up to more than twice"):
        read_checkpoint(shared)


def test_real_layout_checkpoints_still_pass_the_checks(tmp_path, tiny_v1):
    sd = tiny_v1.state_dict()
    save_checkpoint(
        {"state_dict": sd, "optimizer": {"state": {0: {"step": torch.tensor(1.0)}}}},
        tmp_path / "m.ckpt",
    )
    save_safetensors(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    for name in ("m.ckpt", "m.safetensors"):
        model = load_model_from_config(tiny_config("v1"), tmp_path / name)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_evaluator_weight_files_obey_the_same_rules(tmp_path):
    zipped = tmp_path / "dino.pth"
    torch.save({"w" * 2**20: torch.zeros(1)}, zipped)  # a 1 MB name: a plain state dict
    deflated(zipped)
    for load in (lambda: load_state_dict_file(zipped, "url"), lambda: load_clip(zipped)):
        with pytest.raises(
            CheckpointError, match=r"dino.pth: zip entry '.*data.pkl' is compressed"
        ):
            load()
    expanded = tmp_path / "lpips.pth"
    torch.save({"w": torch.zeros(1).expand(2**29)}, expanded)
    with pytest.raises(CheckpointError, match=r"lpips.pth: tensor \['w'\] has 536870912 elements"):
        load_state_dict_file(expanded, "url")


def test_a_caption_file_is_read_only_up_to_its_limit(tmp_path):
    tw.write_world(tmp_path / "world", 2, seed=0)
    (tmp_path / "world" / "00001.txt").write_text("a photo of a ball, " * 4000)  # 76 KB
    with pytest.raises(DataError, match=f"00001.txt: over {MAX_CAPTION_BYTES} bytes"):
        DreamBoothDataset(tmp_path / "world", "sks", None, size=64, captions=True)
