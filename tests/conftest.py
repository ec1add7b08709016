"""Shared test parts: small real IDX files, a temporary copy of the repo, real dvc and mlflow processes."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: torch.Tensor) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000080N, N big-endian dimensions, then the data."""
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def make_split(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 28x28 images: class c lights up row band c, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    images = torch.randint(0, 60, (count, 28, 28), generator=generator)
    for index, label in enumerate(labels.tolist()):
        images[index, 2 * label + 3 : 2 * label + 6, 4:24] += 180
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four gzipped IDX files (600 train, 200 test images) and the SHA-256 of their decompressed bytes."""
    directory = tmp_path_factory.mktemp("tiny_idx")
    files, sha256 = {}, {}
    train, test = make_split(600, seed=1), make_split(200, seed=2)
    for kind, name, array in [
        ("train_images", "train-images-idx3-ubyte", train[0]),
        ("train_labels", "train-labels-idx1-ubyte", train[1]),
        ("test_images", "t10k-images-idx3-ubyte", test[0]),
        ("test_labels", "t10k-labels-idx1-ubyte", test[1]),
    ]:
        data = idx_bytes(array)
        (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        files[kind], sha256[kind] = data, hashlib.sha256(data).hexdigest()
    return {"dir": directory, "files": files, "sha256": sha256}


def tool_env(**extra: str) -> dict:
    """The environment for dvc/python subprocesses: this venv first on PATH."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_tool(
    args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def under_ulimit(option: str, value: int, command: list[str]) -> list[str]:
    """`command` run under bash's `ulimit <option> <value>` (KiB for -v and -f), set by the shell that `exec`s it.
    Never subprocess's preexec_fn: that runs Python between fork and exec in this test process, whose other threads
    (Ray's, MLflow's) can leave such a child deadlocked before exec, and Popen with it, past any timeout."""
    return ["bash", "-c", f'ulimit {option} {value}; exec "$@"', "bash", *command]


def copy_repo(destination: Path) -> Path:
    """The repo's tracked files (no data, no results, but their .gitignore files: what git keeps of an output
    decides what `dvc exp apply` can bring back) as a fresh git repo."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        output = name.startswith(("results/", "reports/", "metrics/")) and not name.endswith("/.gitignore")
        if name == "dvc.lock" or output:
            continue
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run([*git, "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=destination, check=True)
    return destination


def commit_all(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message],
        cwd=repo,
        check=True,
    )


def edit_params(repo: Path, change) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_params(tiny: dict, epochs: int = 2) -> callable:
    """Params for the tiny dataset: its own hashes, one local source, 100 validation images, two seeds,
    two short variants and one that diverges."""

    def change(params: dict) -> None:
        params["data"].update(dataset="tiny", sources=[str(tiny["dir"])], sha256=tiny["sha256"])
        params["prepare"].update(validation=100, seed=0)
        params["train"].pop("seed", None)
        params["train"].update(epochs=epochs, batch_size=64, device="auto", seeds=[0, 1])
        params["variants"] = {"base": {"init_std": 0.01}, "scratch": {"impl": "scratch"}, "exploding": {"lr": 1e5}}
        params["init_scale"].update(stds=[0.01, 1.0], seeds=[0, 1], epochs=2, report_epochs=[1, 2], probe=64)

    return change


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact directory."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            (root / "artifacts").as_uri(),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=tool_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}") from None
            time.sleep(0.5)
    else:
        process.kill()
        raise AssertionError("mlflow server did not answer within 120 s")
    yield uri
    os.killpg(process.pid, 15)
    process.wait(timeout=30)
    log.close()


def pytest_collection_modifyitems(items: list) -> None:
    """PYTEST_REVERSE=1 runs the tests in reverse order: a check that none depends on another's leftovers."""
    if os.environ.get("PYTEST_REVERSE") == "1":
        items.reverse()
