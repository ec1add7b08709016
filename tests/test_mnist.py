"""MNIST digits through the same stages (lessons/mnist, its own DVC project), fed by an HTTP server on 127.0.0.1.

The real MNIST cannot be fetched here, so the server hands out small generated IDX files and the params
pin their hashes under a dataset name of their own; everything else is the MNIST pipeline as users run it.
"""

from __future__ import annotations

import functools
import http.server
import json
import sys
import threading

import pytest
import yaml

from pipeline.datasets import BUILT_IN
from tests.conftest import commit_all, copy_repo, run_tool, tool_env

pytestmark = pytest.mark.integration

VARIANTS = {
    "mlp_512": {"hidden": [512]},
    "mlp_512_mse": {"loss": "mse", "lr": 0.5},
    "mlp_512_l1": {"loss": "l1", "lr": 0.5},
}


@pytest.fixture(scope="module")
def mirror(tiny_dataset):
    """A real HTTP server serving the tiny .gz files under /mnist/."""
    root = tiny_dataset["dir"].parent / "mirror"
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    for path in tiny_dataset["dir"].glob("*.gz"):
        (root / "mnist" / path.name).write_bytes(path.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mnist/"
    server.shutdown()


@pytest.fixture(scope="module")
def mnist_repo(tmp_path_factory, tiny_dataset, mirror):
    """The lesson run as users run it (cd lessons/mnist && dvc repro), logging to the default embedded store."""
    repo = copy_repo(tmp_path_factory.mktemp("mnist_repo"))
    path = repo / "lessons/mnist/params.yaml"
    params = yaml.safe_load(path.read_text())
    params["data"].update(dataset="mnist_tiny", sources=[mirror], sha256=tiny_dataset["sha256"], timeout_s=5)
    params["prepare"].update(validation=100)  # of the tiny dataset's 600 train images
    params["train"].update(epochs=2, batch_size=64, seeds=[0])
    params["variants"] = VARIANTS
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(repo, "tiny MNIST")
    env = tool_env()  # no MLFLOW_TRACKING_URI: the embedded store, which DVC_ROOT=lessons/mnist must not move
    output = run_tool(["dvc", "repro"], repo / "lessons/mnist", env).stdout
    return {"repo": repo, "output": output, "uri": f"sqlite:///{repo / 'mlflow.db'}", "mirror": mirror, "env": env}


def test_mnist_params_default_to_the_pinned_mnist_and_a_512_wide_net():
    from pipeline import config
    from tests.conftest import REPO

    params = config.load(REPO / "lessons/mnist/params.yaml")
    assert params.data.dataset == "mnist" and "mnist" in BUILT_IN
    assert params.variant("mlp_512").hidden == (512,)
    assert {variant.loss for variant in params.variants.values()} >= {"cross_entropy", "mse"}


def test_mnist_pipeline_downloads_over_http_and_trains_each_loss(mnist_repo):
    repo = mnist_repo["repo"]
    record = json.loads((repo / "lessons/mnist/data/raw/mnist_tiny.json").read_text())
    assert all(file["source"].startswith(mnist_repo["mirror"]) for file in record["files"].values())
    for name in VARIANTS:
        model = json.loads((repo / f"lessons/mnist/models/{name}/seed-0.json").read_text())
        assert model["hidden"] == [512] and model["diverged"] is False
        evaluation = json.loads((repo / f"lessons/mnist/reports/evaluation/{name}.json").read_text())
        assert evaluation["test_accuracy_mean"] > 0.5, name  # the tiny digits are learnable with every loss
    table = (repo / "lessons/mnist/reports/compare.md").read_text()
    assert "loss=mse" in table and "loss=l1" in table
    assert not (repo / "results").exists()  # the Fashion-MNIST pipeline did not run


def test_mnist_runs_go_to_their_own_experiment(mnist_repo):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mnist_repo["uri"])
    experiment = client.get_experiment_by_name("d2l-mnist")
    names = {run.info.run_name for run in client.search_runs([experiment.experiment_id])}
    assert {"download", "prepare", "train@mlp_512", "train@mlp_512_mse", "train@mlp_512_l1", "compare"} <= names
    mse = next(
        run for run in client.search_runs([experiment.experiment_id]) if run.info.run_name == "train@mlp_512_mse"
    )
    assert mse.data.params["loss"] == "mse" and mse.data.params["hidden"] == "(512,)"


def test_mnist_logs_to_the_root_store_and_leaves_the_root_pipeline_clean(mnist_repo):
    repo = mnist_repo["repo"]
    assert (repo / "mlflow.db").exists() and not (repo / "lessons/mnist/mlflow.db").exists()
    assert not (repo / "lessons/mnist/mlartifacts").exists()
    dirty = run_tool(
        [sys.executable, "-c", "from pipeline import tracking; print(tracking.code_dirty())"], repo, mnist_repo["env"]
    )
    assert dirty.stdout.strip() == "False"  # the lesson's outputs are not code: root runs stay promotable
    assert run_tool(["git", "status", "--porcelain", "lessons/mnist/results"], repo).stdout  # they are untracked
