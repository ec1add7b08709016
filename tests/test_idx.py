"""IDX files: our reader against torchvision's, and every malformed file rejected with an IdxError naming it."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

from pipeline import idx
from tests.conftest import REPO, idx_bytes, make_split

IMAGES, LABELS = make_split(30, seed=3)


def write_idx(directory: Path, name: str, array: torch.Tensor, gzipped: bool) -> tuple[Path, Path]:
    """The same IDX file twice: plain (what torchvision reads) and, if asked, gzipped (what we read)."""
    plain = directory / name
    plain.write_bytes(idx_bytes(array))
    if not gzipped:
        return plain, plain
    compressed = directory / f"{name}.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    return plain, compressed


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "name, array", [("images-idx3-ubyte", IMAGES), ("labels-idx1-ubyte", LABELS)], ids=["images", "labels"]
)
def test_read_matches_torchvision(tmp_path: Path, name: str, array: torch.Tensor, gzipped: bool):
    plain, ours_path = write_idx(tmp_path, name, array, gzipped)
    ours = idx.read(ours_path)
    reference = read_sn3_pascalvincent_tensor(str(plain), strict=False)
    assert ours.dtype == reference.dtype == torch.uint8
    assert ours.shape == reference.shape == array.shape
    assert torch.equal(ours, reference)
    assert torch.equal(ours, array)


def with_magic(data: bytes, magic: bytes) -> bytes:
    return magic + data[4:]


GOOD_IMAGES, GOOD_LABELS = idx_bytes(IMAGES), idx_bytes(LABELS)
MALFORMED = {  # case -> (bytes, kind, expected count, words the message must hold)
    "images with signed-byte magic": (with_magic(GOOD_IMAGES, b"\0\0\x09\x03"), "train_images", None, "bad magic"),
    "byte-swapped magic": (with_magic(GOOD_IMAGES, b"\x03\x08\0\0"), "train_images", None, "not an IDX file"),
    "html page": (b"<!DOCTYPE html><html>Not found</html>", "train_labels", None, "not an IDX file"),
    "27x28 images": (idx_bytes(IMAGES[:, :27, :]), "train_images", None, "expected (N, 28, 28)"),
    "1-D images": (idx_bytes(LABELS), "train_images", None, "expected (N, 28, 28)"),
    "2-D labels": (idx_bytes(LABELS.reshape(3, 10)), "train_labels", None, "bad magic number 0x00000802"),
    "3-D labels": (GOOD_IMAGES, "train_labels", None, "expected (N,) labels"),
    "header says more items": (GOOD_LABELS[:-1], "train_labels", None, "37 bytes, expected 38 for dimensions (30,)"),
    "header truncated": (GOOD_IMAGES[:10], "train_images", None, "header truncated"),
    "other item count": (GOOD_LABELS, "train_labels", 31, "30 items, expected 31"),
    "label 10": (idx_bytes(torch.tensor([0, 9, 10, 3])), "test_labels", None, "label 10 out of range"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_check_rejects_malformed_file_naming_it(case: str):
    data, kind, count, words = MALFORMED[case]
    with pytest.raises(idx.IdxError) as raised:
        idx.check(data, "/data/some-file-idx", kind, count, classes=10)
    assert str(raised.value).startswith("/data/some-file-idx: ")
    assert words in str(raised.value)
    assert "\n" not in str(raised.value)


def test_header_with_more_items_than_bytes_reports_both_sizes():
    short = GOOD_IMAGES[:-28]  # one row of the last image missing
    with pytest.raises(
        idx.IdxError,
        match=rf"f.idx: {len(short)} bytes, expected {len(GOOD_IMAGES)} "
        r"for dimensions \(30, 28, 28\)",
    ):
        idx.parse_header(short, "f.idx")


def test_good_files_pass_check():
    assert idx.check(GOOD_IMAGES, "i", "train_images", 30, classes=10).dims == (30, 28, 28)
    assert idx.check(GOOD_LABELS, "l", "test_labels", 30, classes=10).dims == (30,)


def test_truncated_gzip_names_the_file(tmp_path: Path):
    archive = gzip.compress(GOOD_IMAGES)
    with pytest.raises(idx.IdxError, match=r"^cut\.gz: bad gzip data"):
        idx.decompress(archive[: len(archive) // 2], "cut.gz")
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(archive[:-4])  # only the length trailer missing
    with pytest.raises(idx.IdxError, match=rf"^{path}: bad gzip data"):
        idx.read(path)


def test_plain_bytes_pass_decompress_unchanged():
    assert idx.decompress(GOOD_LABELS, "plain") is GOOD_LABELS


OPTIMIZED_CHECKS = textwrap.dedent("""
    import sys
    from pipeline import idx
    assert False, "asserts must be stripped here"
    cases = [(bytes([0, 0, 8, 2, 0, 0, 0, 1, 0, 0, 0, 1, 5]), "train_labels", None),  # 2-D labels
             (bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 12]), "train_labels", None),  # label 12
             (bytes([0, 0, 8, 1, 0, 0, 0, 3, 1]), "train_labels", None),  # 3 items, 1 byte
             (bytes([0, 0, 8, 1, 0, 0, 0, 1, 1]), "train_labels", 2)]  # 1 item, 2 expected
    for data, kind, count in cases:
        try:
            idx.check(data, "opt-file", kind, count, 10)
        except idx.IdxError as error:
            print(error)
        else:
            sys.exit("accepted " + repr(data))
""")


def test_checks_still_raise_under_python_O():
    result = subprocess.run(
        [sys.executable, "-O", "-c", OPTIMIZED_CHECKS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("opt-file: ") for line in lines), result.stdout


def zeros_gzip(inflated_bytes: int) -> bytes:
    """A gzip of `inflated_bytes` zeros (a bomb when large), compressed a MiB at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, idx.GZIP_WBITS)
    return b"".join(compressor.compress(bytes(1 << 20)) for _ in range(inflated_bytes >> 20)) + compressor.flush()


def test_decompress_stops_a_gzip_bomb_at_the_cap_without_holding_more():
    bomb = zeros_gzip(256 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(idx.IdxError, match=r"^bomb\.gz: inflates to more than 1000000 bytes, expected at most"):
            idx.decompress(bomb, "bomb.gz", max_bytes=10**6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 10**6, peak


def test_decompress_takes_exactly_the_cap_and_every_gzip_member():
    assert idx.decompress(gzip.compress(GOOD_IMAGES), "exact.gz", max_bytes=len(GOOD_IMAGES)) == GOOD_IMAGES
    two_members = gzip.compress(GOOD_LABELS[:10]) + gzip.compress(GOOD_LABELS[10:])
    assert idx.decompress(two_members, "two.gz") == GOOD_LABELS == gzip.decompress(two_members)
    with pytest.raises(idx.IdxError, match=r"^junk\.gz: bad gzip data \(trailing garbage"):
        idx.decompress(gzip.compress(GOOD_LABELS) + b"junk", "junk.gz")
    with pytest.raises(idx.IdxError, match=rf"^plain: {len(GOOD_LABELS)} bytes, expected at most 10$"):
        idx.decompress(GOOD_LABELS, "plain", max_bytes=10)


def test_read_refuses_files_over_the_cap_before_reading_them(tmp_path: Path):
    huge = tmp_path / "huge-idx1-ubyte"
    with open(huge, "wb") as sparse:
        sparse.truncate(10**12)  # a terabyte of zeros that takes no disk: reading it would exhaust memory
    with pytest.raises(
        idx.IdxError,
        match=rf"huge-idx1-ubyte: {10**12} bytes, expected at most "
        rf"{idx.archive_cap(idx.DEFAULT_MAX_BYTES)}$",
    ):
        idx.read(huge)
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(zeros_gzip(64 << 20))  # more than the largest built-in file (47 MB)
    with pytest.raises(idx.IdxError, match=rf"bomb-idx3-ubyte.gz: inflates to more than {idx.DEFAULT_MAX_BYTES} "):
        idx.read(bomb)
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(GOOD_LABELS))
    assert torch.equal(idx.read(path, max_bytes=len(GOOD_LABELS)), LABELS)
    with pytest.raises(idx.IdxError, match="inflates to more than 37 bytes"):
        idx.read(path, max_bytes=len(GOOD_LABELS) - 1)
