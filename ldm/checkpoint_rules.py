"""What a checkpoint file must satisfy before its data is used. Checkpoints come from other people,
so a file that breaks its format's rules is refused, in one line naming the tensor or entry,
before it can make the reader allocate more than the file holds or read memory it should not:

- .safetensors: the format's own rules (those of the safetensors library): a header of at most
  100 MB, every tensor's bytes exactly its shape times its dtype's size, the tensors packed
  back to back from the start of the data section to the end of the file, nothing missing,
  overlapping or left over.
- .ckpt (torch.save's zip): no compressed entries (torch.save never compresses; a deflated
  pickle is a zip bomb), and after loading, no tensor with more elements than its storage holds
  (a stride-0 "expanded" tensor becomes huge when made contiguous), and all tensors together
  within twice the file's size (one storage referenced over and over).

Every check costs O(header) or O(number of tensors), never O(bytes): real files are gigabytes.
"""

import json
import math
import os
import zipfile
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's limit
# JSON values in a header, counted from its bytes before parsing (a 100 MB header of tiny values
# would cost gigabytes as Python objects); an SD v1 file has about 15 thousand.
MAX_HEADER_VALUES = 1_000_000
MAX_DIMS = 64
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def read_safetensors_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, where the data section starts) of a .safetensors file whose
    header obeys the format's rules; CheckpointError naming the file (and tensor) otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: not a safetensors file (header of {header_len} bytes in a file of "
                f"{size}; the format allows {MAX_HEADER_BYTES})"
            )
        raw = f.read(header_len)
    # An upper bound on the values (commas and openings count those inside strings too).
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > MAX_HEADER_VALUES:
        raise CheckpointError(f"{path}: header has over {MAX_HEADER_VALUES} values; refused")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ is not a map of strings to strings")
    for key, entry in header.items():
        _check_entry(path, key, entry)
    _check_layout(path, header, size - 8 - header_len)
    return header, metadata, 8 + header_len


def _is_counts(value: object) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


def _check_entry(path: Path, key: str, entry: object) -> None:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {key!r} {why}")

    if not isinstance(entry, dict):
        raise bad("has no dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise bad(f"has unsupported dtype {dtype!r}")
    if not _is_counts(shape) or len(shape) > MAX_DIMS:
        raise bad(f"has a malformed shape {str(shape)[:80]}")
    if not (_is_counts(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise bad(f"has malformed data_offsets {str(offsets)[:80]} (need 0 <= begin <= end)")
    nbytes, held = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize, offsets[1] - offsets[0]
    if held != nbytes:
        raise bad(f"holds {held} bytes but its shape {shape} of {dtype} needs {nbytes}")


def _check_layout(path: Path, entries: dict, data_len: int) -> None:
    """Tensors back to back from byte 0 of the data section to its end: no gap, overlap or
    trailing bytes, and (so) no tensor reaching past the file or into the header."""
    position = 0
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], key) for key, e in entries.items())
    for begin, end, key in spans:
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor {key!r} starts at byte {begin} of the data, expected {position} "
                "(tensors must be packed without gaps or overlaps)"
            )
        if end > data_len:
            raise CheckpointError(f"{path}: truncated (tensor {key!r} ends past the file)")
        position = end
    if position != data_len:
        raise CheckpointError(f"{path}: {data_len - position} bytes after the last tensor")


def check_torch_zip(path: Path) -> None:
    """Refuse a zip checkpoint with a compressed entry before torch.load inflates it. A file
    that is not a zip is left to torch.load (legacy format), which reports it."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{path}: zip entry {info.filename!r} is compressed; torch.save never compresses "
                "(a zip bomb?); refused"
            )


def check_tensors(path: Path, obj: object) -> None:
    """Each tensor within its own storage, and all tensors (each reference counted) within
    twice the file's size. Containers are walked once each, however often they are shared."""
    budget = 2 * os.path.getsize(path)
    total, seen, stack = 0, set(), [(obj, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, torch.Tensor):
            total += _tensor_bytes(path, node, where)
            if total > budget:
                raise CheckpointError(
                    f"{path}: its tensors add up to more than twice the file's size (one "
                    f"storage referenced again and again, e.g. {where}); refused"
                )
        elif isinstance(node, (dict, list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((value, f"{where}[{key!r}]") for key, value in items)


def _tensor_bytes(path: Path, tensor: torch.Tensor, where: str) -> int:
    if tensor.layout != torch.strided:
        raise CheckpointError(f"{path}: {where} is a {tensor.layout} tensor; only dense ones")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > tensor.untyped_storage().nbytes():
        raise CheckpointError(
            f"{path}: tensor {where} has {tensor.numel()} elements but its storage holds "
            f"{tensor.untyped_storage().nbytes() // tensor.element_size()} (an expanded, "
            "stride-0 tensor?); refused"
        )
    return nbytes
