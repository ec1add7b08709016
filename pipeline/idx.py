"""IDX files (the MNIST format): header checks that also run under `python -O`, and decoding to tensors."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip header and checks the CRC and length trailer
IMAGE_SHAPE = (28, 28)
# Without a known item count, a file may hold as many items as MNIST's train split (the largest built-in file).
MAX_ITEMS = 60_000


def file_bytes(kind: str, count: int) -> int:
    """The size of an IDX file of `count` images (N, 28, 28) or labels (N,)."""
    return 16 + count * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] if kind.endswith("images") else 8 + count


DEFAULT_MAX_BYTES = file_bytes("train_images", MAX_ITEMS)


def archive_cap(max_bytes: int) -> int:
    """The most bytes a gzip of a `max_bytes` file can take: deflate's stored blocks add 5 bytes per 64 KiB,
    and the header may carry a file name."""
    return max_bytes + max_bytes // 1000 + 4096


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
        largest = max(data[header.offset :], default=0)
        if largest >= classes:
            raise IdxError(f"{name}: label {largest} out of range, expected 0..{classes - 1}")
    if count is not None and header.dims[0] != count:
        raise IdxError(f"{name}: {header.dims[0]} items, expected {count}")
    return header


def decompress(data: bytes, name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Gunzip when the bytes are gzip, never holding more than `max_bytes` of output (a gzip bomb stops there);
    a truncated, corrupt or oversized file is an IdxError."""
    if not data.startswith(GZIP_MAGIC):
        _check_size(len(data), name, max_bytes)
        return data
    try:
        return _gunzip(data, name, max_bytes)
    except zlib.error as error:
        raise IdxError(f"{name}: bad gzip data ({error})") from None


def _gunzip(data: bytes, name: str, max_bytes: int) -> bytes:
    """Inflate gzip members one after another, at most max_bytes + 1 bytes of output in all."""
    output, inflater, pending = bytearray(), zlib.decompressobj(GZIP_WBITS), data
    while pending:
        output += inflater.decompress(pending, max_bytes + 1 - len(output))  # a max_length of 0 would mean no limit
        if len(output) > max_bytes:
            raise IdxError(f"{name}: inflates to more than {max_bytes} bytes, expected at most {max_bytes}")
        pending = inflater.unconsumed_tail
        if inflater.eof and inflater.unused_data:  # another member follows, as gzip(1) allows
            if not inflater.unused_data.startswith(GZIP_MAGIC):
                raise IdxError(f"{name}: bad gzip data (trailing garbage after a member)")
            pending, inflater = inflater.unused_data, zlib.decompressobj(GZIP_WBITS)
    if not inflater.eof:
        raise IdxError(f"{name}: bad gzip data (compressed file ended before the end-of-stream marker was reached)")
    return bytes(output)


def _check_size(size: int, name: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise IdxError(f"{name}: {size} bytes, expected at most {max_bytes}")


def read_capped(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refused (IdxError) rather than read when it holds more than `max_bytes`."""
    with open(path, "rb") as file:
        _check_size(os.fstat(file.fileno()).st_size, str(path), max_bytes)
        data = file.read(max_bytes + 1)  # the file may have grown since fstat
    _check_size(len(data), str(path), max_bytes)
    return data


def read(path: Path, max_bytes: int = DEFAULT_MAX_BYTES):
    """Decode an IDX file (optionally gzipped) of at most `max_bytes` (decompressed) into a uint8 tensor."""
    import torch  # here, not at module level: the download stage checks headers without paying for torch

    data = decompress(read_capped(path, archive_cap(max_bytes)), str(path), max_bytes)
    header = parse_header(data, str(path))
    flat = torch.frombuffer(bytearray(data[header.offset :]), dtype=torch.uint8)
    return flat.reshape(header.dims)


def _product(dims: tuple[int, ...]) -> int:
    total = 1
    for dim in dims:
        total *= dim
    return total


def max_file_bytes(counts: Mapping[str, int] | None, kind: str) -> int:
    """The size of `kind`'s decompressed file: exact when the split counts are known, else the most MAX_ITEMS allow."""
    return file_bytes(kind, counts[kind.split("_")[0]] if counts else MAX_ITEMS)
