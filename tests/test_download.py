"""The download stage against real sources: a local HTTP server with good, corrupt, cut and stalled mirrors."""

from __future__ import annotations

import gzip
import http.server
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import yaml

from pipeline.datasets import FILE_KINDS, DatasetSpec
from pipeline.errors import PipelineError
from pipeline.idx import archive_cap, file_bytes
from pipeline.stages.download import fetch_verified, run
from tests.conftest import REPO, tool_env

HTML_PAGE = b"<!DOCTYPE html><html><body>Please log in to the captive portal</body></html>"
# Mirror name -> the reason it must be skipped for, as written in the log line and in the final error.
BAD_MIRROR_REASONS = {
    "corrupt": ": sha256 ",
    "truncated": ": truncated, ",
    "html": ": not an IDX file",
    "missing": ": HTTP 404 Not Found",
    "stall-body": ": TimeoutError: timed out after ",
}


def gzip_bomb(inflated_bytes: int) -> bytes:
    """A valid gzip of `inflated_bytes` zeros, about 1000 times smaller, compressed a MiB at a time."""
    compressor, zeros = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), bytes(1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(inflated_bytes >> 20)) + compressor.flush()


BOMB = gzip_bomb(128 << 20)  # 128 MiB inside about 130 KB: under the tiny train images' compressed cap
ENDLESS_STOP = 64 << 20  # the "endless" mirror gives up after this much (only a client without a cap gets there)


def flipped(data: bytes) -> bytes:
    """The same IDX file with the low bit of its last byte flipped (label 9 -> 8): valid, but the wrong hash."""
    return data[:-1] + bytes([data[-1] ^ 1])


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """GET /<mirror>/<file>.gz, where the mirror name says how this mirror misbehaves.

    It speaks HTTP/1.0, so the connection closes after each response: that is what cuts a short body.
    """

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        _, mirror, filename = self.path.split("/", 2)
        good = self.server.archives.get(filename)
        if mirror == "missing" or good is None:
            self.send_error(404)
        elif mirror == "html":
            self.send_body(HTML_PAGE, "text/html")
        elif mirror == "corrupt":
            self.send_body(self.server.corrupt_archives[filename])
        elif mirror in ("truncated", "stall-body"):
            self.send_body(good, sent=len(good) // 2)
            if mirror == "stall-body":  # hold the connection open without sending more
                self.server.release.wait(timeout=30)
        elif mirror == "bad-length":  # a proxy's duplicated header; the body is still the good file
            self.send_body(good, length=f"{len(good)}, {len(good)}")
        elif mirror == "huge-length":
            self.send_body(good, length=str(10**12))
        elif mirror == "bomb":
            self.send_body(BOMB)
        elif mirror in ("trickle", "endless"):
            self.send_slowly(good) if mirror == "trickle" else self.send_endlessly()
        else:
            self.send_body(good)

    def send_slowly(self, body: bytes) -> None:
        """The good file, one byte every 0.1 s: each read is well within the timeout, the whole is not."""
        self.send_body(body, sent=0)
        for offset in range(len(body)):
            if self.server.release.wait(timeout=0.1):
                return
            self.write_or_stop(body[offset : offset + 1])

    def send_endlessly(self) -> None:
        """Zeros without a Content-Length, until the client hangs up (or ENDLESS_STOP)."""
        self.send_response(200)
        self.end_headers()
        for _ in range(ENDLESS_STOP >> 16):
            if not self.write_or_stop(bytes(1 << 16)):
                return

    def write_or_stop(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client gave up on us, as it should
            return False

    def send_body(
        self, body: bytes, content_type: str = "application/gzip", sent: int | None = None, length: str | None = None
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", length or str(len(body)))
        self.end_headers()
        self.wfile.write(body[:sent])
        self.wfile.flush()

    def log_message(self, *args) -> None:  # keep pytest's output to our own lines
        pass


@pytest.fixture(scope="module")
def mirrors(tiny_dataset: dict):
    """A real HTTP server on 127.0.0.1 serving every mirror; .requests lists every path asked for."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MirrorHandler)
    server.archives = {path.name: path.read_bytes() for path in tiny_dataset["dir"].glob("*.gz")}
    server.corrupt_archives = {
        f"{FILE_KINDS[kind]}.gz": gzip.compress(flipped(data)) for kind, data in tiny_dataset["files"].items()
    }
    server.requests, server.release = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def url(server: http.server.HTTPServer, mirror: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{mirror}/"


@pytest.fixture(scope="module")
def stalled_url():
    """A raw TCP server that accepts connections and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted, stop = [], threading.Event()

    def accept_forever() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/stalled/"
    stop.set()
    thread.join()
    for connection in [*accepted, listener]:
        connection.close()


def tiny_spec(tiny: dict, *sources: str | Path) -> DatasetSpec:
    return DatasetSpec(
        name="tiny",
        sha256=tiny["sha256"],
        sources=tuple(str(source) for source in sources),
        counts={"train": 600, "test": 200},
    )


def assert_wrote_good_files(out_dir: Path, records: dict, tiny: dict, source: str) -> None:
    """All four files hold the good bytes, and each record names `source` as where they came from."""
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(FILE_KINDS.values())
    for kind, filename in FILE_KINDS.items():
        assert (out_dir / filename).read_bytes() == tiny["files"][kind]
        assert records[kind]["source"].startswith(source.rstrip("/")), records[kind]
        assert records[kind]["sha256"] == tiny["sha256"][kind]
        assert records[kind]["bytes"] == len(tiny["files"][kind])


def assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert list(out_dir.parent.glob(f".{out_dir.name}.*.tmpdir")) == []


def test_good_mirror_gives_verified_files(tiny_dataset: dict, mirrors, tmp_path: Path):
    good = url(mirrors, "good")
    records = run(tiny_spec(tiny_dataset, good), tmp_path / "raw", timeout_s=5)
    assert_wrote_good_files(tmp_path / "raw", records, tiny_dataset, good)
    assert records["train_images"]["source"] == f"{good}train-images-idx3-ubyte.gz"


@pytest.mark.parametrize("bad_mirror", BAD_MIRROR_REASONS)
def test_bad_mirror_falls_through_to_the_next(tiny_dataset: dict, mirrors, tmp_path: Path, capsys, bad_mirror: str):
    good = url(mirrors, "good")
    spec = tiny_spec(tiny_dataset, url(mirrors, bad_mirror), good)
    records = run(spec, tmp_path / "raw", timeout_s=0.5)
    assert_wrote_good_files(tmp_path / "raw", records, tiny_dataset, good)
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipping source" in line]
    assert len(skipped) == 4, skipped
    assert all(BAD_MIRROR_REASONS[bad_mirror] in line and url(mirrors, bad_mirror) in line for line in skipped)


def test_malformed_content_length_is_read_to_the_end_and_verified(tiny_dataset: dict, mirrors, tmp_path: Path):
    odd = url(mirrors, "bad-length")
    records = run(tiny_spec(tiny_dataset, odd, url(mirrors, "good")), tmp_path / "raw", timeout_s=1)
    assert_wrote_good_files(tmp_path / "raw", records, tiny_dataset, odd)


def test_stalled_server_times_out_and_falls_through(tiny_dataset: dict, mirrors, stalled_url: str):
    good = url(mirrors, "good")
    started = time.monotonic()
    data, source = fetch_verified(tiny_spec(tiny_dataset, stalled_url, good), "test_labels", timeout_s=1)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 4, elapsed
    assert (data, source) == (tiny_dataset["files"]["test_labels"], f"{good}t10k-labels-idx1-ubyte.gz")


LABELS_CAP = archive_cap(file_bytes("test_labels", 200))  # the most a compressed test_labels of 200 items takes


@pytest.mark.parametrize(
    "mirror, kind, reason",
    [
        ("trickle", "test_labels", ": too slow, "),
        ("endless", "test_labels", f": more than {LABELS_CAP} bytes, expected at most {LABELS_CAP}"),
        ("huge-length", "test_labels", f": Content-Length {10**12} bytes, expected at most {LABELS_CAP}"),
        ("bomb", "train_images", f": inflates to more than {file_bytes('train_images', 600)} bytes, expected at most "),
    ],
)
def test_unbounded_mirror_is_cut_off_and_the_next_one_used(
    tiny_dataset: dict, mirrors, capsys, mirror: str, kind: str, reason: str
):
    good, bad, filename = url(mirrors, "good"), url(mirrors, mirror), f"{FILE_KINDS[kind]}.gz"
    # timeout 0.5 s per read, 1 KB/s: the trickle's deadline is 0.5 + 208 bytes / 1000 bytes/s = 0.7 s
    data, source = fetch_verified(tiny_spec(tiny_dataset, bad, good), kind, timeout_s=0.5, min_kbytes_per_s=1)
    assert (data, source) == (tiny_dataset["files"][kind], good + filename)
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipping source" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"{FILE_KINDS[kind]}: skipping source: {bad}{filename}{reason}")


def test_local_gzip_bomb_and_oversized_file_are_skipped_for_the_next_source(tiny_dataset: dict, tmp_path: Path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(BOMB)
    with open(bad / "train-labels-idx1-ubyte", "wb") as sparse:
        sparse.truncate(10**12)  # a terabyte of zeros that takes no disk, and must never be read
    spec = tiny_spec(tiny_dataset, bad, tiny_dataset["dir"])
    for kind in ("train_images", "train_labels"):
        assert fetch_verified(spec, kind, timeout_s=1)[0] == tiny_dataset["files"][kind]
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipping source" in line]
    images_bytes, labels_cap = file_bytes("train_images", 600), archive_cap(file_bytes("train_labels", 600))
    assert skipped == [
        (
            f"train-images-idx3-ubyte: skipping source: {bad}/train-images-idx3-ubyte.gz: inflates to more than "
            f"{images_bytes} bytes, expected at most {images_bytes}"
        ),
        (
            f"train-labels-idx1-ubyte: skipping source: {bad}/train-labels-idx1-ubyte: {10**12} bytes, "
            f"expected at most {labels_cap}"
        ),
    ]


def test_all_sources_failing_names_each_reason_and_writes_nothing(
    tiny_dataset: dict, mirrors, stalled_url: str, tmp_path: Path
):
    name, half = "train-images-idx3-ubyte", len(mirrors.archives["train-images-idx3-ubyte.gz"]) // 2
    reasons = {url(mirrors, mirror): f"{name}.gz{reason}" for mirror, reason in BAD_MIRROR_REASONS.items()}
    reasons[url(mirrors, "stall-body")] += f"{half} bytes"
    reasons[stalled_url] = f"{name}.gz: TimeoutError: timed out after 0 bytes"
    reasons[str(tmp_path / "no-such-dir")] = f"/{name}[.gz]: No such file or directory"
    out_dir = tmp_path / "raw"
    with pytest.raises(PipelineError) as raised:
        run(tiny_spec(tiny_dataset, *reasons), out_dir, timeout_s=0.5)
    prefix = f"{name}: no source has the verified tiny file ("
    assert str(raised.value).startswith(prefix) and str(raised.value).endswith(")")
    failures = str(raised.value)[len(prefix) : -1].split("; ")
    assert len(failures) == len(reasons) and "\n" not in str(raised.value)
    for failure, (source, reason) in zip(failures, reasons.items()):
        assert failure.startswith(source + reason), (failure, source + reason)
    assert_nothing_written(out_dir)


def test_no_sources_is_an_error(tiny_dataset: dict):
    with pytest.raises(PipelineError, match=r"train-labels-idx1-ubyte: .*\(no sources given\)"):
        fetch_verified(tiny_spec(tiny_dataset), "train_labels", timeout_s=1)


def test_plain_file_cut_by_a_crash_falls_through(tiny_dataset: dict, tmp_path: Path):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for kind, filename in FILE_KINDS.items():
        (crashed / filename).write_bytes(tiny_dataset["files"][kind])
    cut = crashed / FILE_KINDS["train_images"]
    cut.write_bytes(cut.read_bytes()[:-1000])
    records = run(tiny_spec(tiny_dataset, crashed, tiny_dataset["dir"]), tmp_path / "raw", timeout_s=1)
    assert records["train_images"]["source"] == str(tiny_dataset["dir"] / "train-images-idx3-ubyte.gz")
    assert records["test_images"]["source"] == str(crashed / "t10k-images-idx3-ubyte")
    assert (tmp_path / "raw" / "train-images-idx3-ubyte").read_bytes() == tiny_dataset["files"]["train_images"]


def test_local_sources_are_tried_in_order_before_http(tiny_dataset: dict, mirrors, tmp_path: Path):
    second = shutil.copytree(tiny_dataset["dir"], tmp_path / "second")
    mirrors.requests.clear()
    spec = tiny_spec(tiny_dataset, tmp_path / "missing", second, tiny_dataset["dir"], url(mirrors, "good"))
    records = run(spec, tmp_path / "raw", timeout_s=1)
    assert_wrote_good_files(tmp_path / "raw", records, tiny_dataset, str(second))
    assert mirrors.requests == []


def test_old_output_is_replaced_only_on_success(tiny_dataset: dict, mirrors, tmp_path: Path):
    out_dir = tmp_path / "raw"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("from an earlier run")
    with pytest.raises(PipelineError):
        run(tiny_spec(tiny_dataset, url(mirrors, "missing")), out_dir, timeout_s=1)
    assert [path.name for path in out_dir.iterdir()] == ["old.txt"]
    assert (out_dir / "old.txt").read_text() == "from an earlier run"
    assert list(tmp_path.glob(".raw.*.tmpdir")) == []
    records = run(tiny_spec(tiny_dataset, url(mirrors, "good")), out_dir, timeout_s=1)
    assert_wrote_good_files(out_dir, records, tiny_dataset, url(mirrors, "good"))
    assert list(tmp_path.glob(".raw.*.tmpdir")) == []


@pytest.mark.integration
def test_cli_with_bad_params_exits_2_with_one_error_line(tmp_path: Path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["timeout_s"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.download",
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(tmp_path / "raw"),
            "--record",
            str(tmp_path / "download.json"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: data.timeout_s: got -1, expected a number > 0"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
