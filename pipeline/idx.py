"""IDX files (the MNIST format): header checks that also run under `python -O`, and decoding to tensors."""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
IMAGE_SHAPE = (28, 28)


class IdxError(PipelineError):
    """A file that is not the IDX file we expect."""


@dataclass(frozen=True)
class IdxHeader:
    dims: tuple[int, ...]
    offset: int  # where the data starts


def parse_header(data: bytes, name: str) -> IdxHeader:
    """Check magic, dimensions and size; raise IdxError naming the file."""
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise IdxError(f"{name}: not an IDX file (starts with {data[:16]!r})")
    dtype, ndim = data[2], data[3]
    if dtype != UBYTE or ndim not in (1, 3):
        raise IdxError(f"{name}: bad magic number 0x{data[:4].hex()}, expected 0x00000801 or 0x00000803")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise IdxError(f"{name}: header truncated at {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    expected_size = offset + _product(dims)
    if len(data) != expected_size:
        raise IdxError(f"{name}: {len(data)} bytes, expected {expected_size} for dimensions {dims}")
    return IdxHeader(dims, offset)


def check(data: bytes, name: str, kind: str, count: int | None, classes: int) -> IdxHeader:
    """Check an IDX file against what its kind must hold: image or label, item count, label range."""
    header = parse_header(data, name)
    if kind.endswith("images") and (len(header.dims) != 3 or header.dims[1:] != IMAGE_SHAPE):
        raise IdxError(f"{name}: dimensions {header.dims}, expected (N, 28, 28) images")
    if kind.endswith("labels"):
        if len(header.dims) != 1:
            raise IdxError(f"{name}: dimensions {header.dims}, expected (N,) labels")
        largest = max(data[header.offset:], default=0)
        if largest >= classes:
            raise IdxError(f"{name}: label {largest} out of range, expected 0..{classes - 1}")
    if count is not None and header.dims[0] != count:
        raise IdxError(f"{name}: {header.dims[0]} items, expected {count}")
    return header


def decompress(data: bytes, name: str) -> bytes:
    """Gunzip when the bytes are gzip; a truncated or corrupt archive is an IdxError."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as error:
        raise IdxError(f"{name}: bad gzip data ({error})") from None


def read(path: Path):
    """Decode an IDX file (optionally gzipped) into a uint8 tensor of its dimensions."""
    import torch  # here, not at module level: the download stage checks headers without paying for torch

    data = decompress(Path(path).read_bytes(), str(path))
    header = parse_header(data, str(path))
    flat = torch.frombuffer(bytearray(data[header.offset:]), dtype=torch.uint8)
    return flat.reshape(header.dims)


def _product(dims: tuple[int, ...]) -> int:
    total = 1
    for dim in dims:
        total *= dim
    return total
