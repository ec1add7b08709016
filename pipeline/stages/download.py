"""Stage `download`: fetch the four IDX files, prove they are the real dataset, write them atomically.

Sources are tried in order for each file (local directories, then HTTP(S) mirrors); a file is
accepted only if its decompressed bytes pass the IDX checks and match the SHA-256 pinned for it.
Every source is bounded: an HTTP source must send the file within data.timeout_s plus the file's size at
data.min_kbytes_per_s, and no source may give more bytes than the file has, compressed or decompressed
(so a trickling mirror, an endless body or a gzip bomb is skipped like any bad source).
"""

from __future__ import annotations

import hashlib
import http.client
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline import cli, config, idx, tracking
from pipeline.cli import stage_entry
from pipeline.datasets import FILE_KINDS, DatasetSpec
from pipeline.errors import PipelineError
from pipeline.files import atomic_dir, write_json

CHUNK_BYTES = 1 << 20
DEFAULT_MIN_KBYTES_PER_S = 50.0  # what params.yaml sets; here for callers that pass only a timeout


class SourceError(PipelineError):
    """A source that could not give a file: missing, unreachable, stalled, or cut short."""


def run(
    spec: DatasetSpec, out_dir: Path, timeout_s: float, min_kbytes_per_s: float = DEFAULT_MIN_KBYTES_PER_S
) -> dict[str, dict]:
    """Write the verified files to `out_dir`; return kind -> {file, source, sha256, bytes}."""
    records = {}
    with atomic_dir(out_dir) as temp:
        for kind, filename in FILE_KINDS.items():
            data, source = fetch_verified(spec, kind, timeout_s, min_kbytes_per_s)
            (temp / filename).write_bytes(data)
            records[kind] = {"file": filename, "source": source, "sha256": spec.sha256[kind], "bytes": len(data)}
    return records


def fetch_verified(
    spec: DatasetSpec, kind: str, timeout_s: float, min_kbytes_per_s: float = DEFAULT_MIN_KBYTES_PER_S
) -> tuple[bytes, str]:
    """The decompressed, verified bytes of one file, from the first source that has them."""
    filename, failures = FILE_KINDS[kind], []
    max_bytes = idx.max_file_bytes(spec.counts, kind)
    for where in candidates(spec.sources, filename):
        try:
            # Each source gets the time a minimum rate needs for the whole file, plus one timeout to connect.
            deadline = time.monotonic() + timeout_s + max_bytes / (min_kbytes_per_s * 1000)
            raw = read_source(where, timeout_s, idx.archive_cap(max_bytes), deadline)
            data = idx.decompress(raw, where, max_bytes)
            verify(data, spec, kind, where)
            print(f"{filename}: verified from {where}", file=sys.stderr)
            return data, where
        except PipelineError as error:
            failures.append(str(error))
            print(f"{filename}: skipping source: {error}", file=sys.stderr)
    reasons = "; ".join(failures) or "no sources given"
    raise PipelineError(f"{filename}: no source has the verified {spec.name} file ({reasons})")


def verify(data: bytes, spec: DatasetSpec, kind: str, where: str) -> None:
    """IDX structure first (for a clear reason), then the pinned hash (for certainty)."""
    split = kind.split("_")[0]
    count = spec.counts[split] if spec.counts else None
    idx.check(data, where, kind, count, spec.classes)
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256[kind]:
        raise idx.IdxError(f"{where}: sha256 {actual}, expected {spec.sha256[kind]}")


def candidates(sources: tuple[str, ...], filename: str) -> list[str]:
    """Where to look, in order: a mirror's `<name>.gz`; a directory's `<name>` and then `<name>.gz`
    (both, since an extracted copy may have been cut short by a crash while the archive is fine)."""
    where = []
    for source in sources:
        if is_url(source):
            where.append(source.rstrip("/") + f"/{filename}.gz")
        else:
            found = [str(path) for path in (Path(source) / filename, Path(source) / f"{filename}.gz") if path.is_file()]
            where += found or [str(Path(source) / f"{filename}[.gz]")]
    return where


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_source(where: str, timeout_s: float, max_bytes: int, deadline: float) -> bytes:
    """The bytes at a URL or a local path, at most `max_bytes`; a URL must have sent them by `deadline`."""
    if is_url(where):
        return http_get(where, timeout_s, max_bytes, deadline)
    try:
        return idx.read_capped(Path(where), max_bytes)
    except OSError as error:
        raise SourceError(f"{where}: {error.strerror}") from None


def http_get(url: str, timeout_s: float, max_bytes: int, deadline: float) -> bytes:
    """GET with a bounded connect and per-read timeout, a total deadline, a byte cap, and a length check."""
    request = urllib.request.Request(url, headers={"User-Agent": "d2l-mlp-pipeline"})
    body = Body(url, max_bytes, deadline)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            # http.client's own parse of Content-Length: None when absent, chunked, or malformed ("10, 10")
            total = response.length or 0
            body.expect(total)
            while chunk := response.read1(min(CHUNK_BYTES, body.room())):  # what has arrived, so a stall shows it
                body.add(chunk)
    except urllib.error.HTTPError as error:
        raise SourceError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:  # timeouts, refused or reset connections
        reason = getattr(error, "reason", None) or error
        raise SourceError(f"{url}: {type(error).__name__}: {reason} after {body.received} bytes") from None
    if total and body.received != total:
        raise SourceError(f"{url}: truncated, {body.received} of {total} bytes")
    return body.data()


class Body:
    """A response body as it arrives: refused past `max_bytes` or past `deadline`, with a progress line."""

    def __init__(self, url: str, max_bytes: int, deadline: float) -> None:
        self.url, self.max_bytes, self.deadline, self.started = url, max_bytes, deadline, time.monotonic()
        self.chunks: list[bytes] = []
        self.received, self.progress = 0, Progress(url, 0)

    def expect(self, total: int) -> None:
        """Refuse a body announced larger than the cap before reading any of it."""
        if total > self.max_bytes:
            raise SourceError(f"{self.url}: Content-Length {total} bytes, expected at most {self.max_bytes}")
        self.progress = Progress(self.url, total)

    def room(self) -> int:
        """How much to read next: one byte past the cap is enough to know the body is too large."""
        return self.max_bytes + 1 - self.received

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.received += len(chunk)
        self.progress.update(self.received)
        if self.received > self.max_bytes:
            raise SourceError(f"{self.url}: more than {self.max_bytes} bytes, expected at most {self.max_bytes}")
        if time.monotonic() > self.deadline:
            raise SourceError(
                f"{self.url}: too slow, {self.received} bytes in {time.monotonic() - self.started:.1f} s, "
                f"past its {self.deadline - self.started:.1f} s (data.timeout_s + the file's size "
                "at data.min_kbytes_per_s)"
            )

    def data(self) -> bytes:
        return b"".join(self.chunks)


class Progress:
    """A download progress line on stderr: redrawn on a terminal, every 25% in a log."""

    def __init__(self, url: str, total: int) -> None:
        self.url, self.total, self.shown, self.started = url, total, -1, time.monotonic()

    def update(self, received: int) -> None:
        if not self.total:
            return
        percent = 100 * received // self.total
        step = 1 if sys.stderr.isatty() else 25
        if percent // step > self.shown // step or percent == 100 and self.shown != 100:
            self.shown = percent
            rate = received / max(time.monotonic() - self.started, 1e-6) / 1e6
            end = "\r" if sys.stderr.isatty() and percent < 100 else "\n"
            print(f"{self.url}: {percent:3d}% of {self.total / 1e6:.1f} MB, {rate:.1f} MB/s", end=end, file=sys.stderr)


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for the four IDX files")
    parser.add_argument("--record", type=Path, required=True, help="JSON: each file's source, hash and size")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    spec = params.data.spec()

    started = time.monotonic()
    records = run(spec, args.out, params.data.timeout_s, params.data.min_kbytes_per_s)
    seconds = time.monotonic() - started
    with tracking.logged_run("download", params.mlflow.experiment):
        import mlflow

        mlflow.log_params(
            {
                "dataset": spec.name,
                "sources": " ".join(spec.sources)[:6000],
                "timeout_s": params.data.timeout_s,
                "min_kbytes_per_s": params.data.min_kbytes_per_s,
            }
        )
        for kind, record in records.items():
            mlflow.log_params(
                {
                    f"{kind}.source": record["source"],
                    f"{kind}.sha256": record["sha256"],
                    f"{kind}.bytes": record["bytes"],
                }
            )
        mlflow.log_metrics({"seconds": seconds, "bytes": sum(record["bytes"] for record in records.values())})
        mlflow.log_dict(records, "download.json")
    write_json(args.record, {"files": records})


if __name__ == "__main__":
    main()
