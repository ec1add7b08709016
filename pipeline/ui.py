"""Open the MLflow UI on the project's store, on the training runs: `python -m pipeline.ui [--port N] [--experiment E]`.

Starts `mlflow ui` on 127.0.0.1 over the store the stages log to (tracking.tracking_uri()) and prints the
experiment's link. The link carries `?workflowType=machine_learning`: MLflow 3's UI otherwise opens an
experiment in its GenAI view (traces, no runs), a mode it keeps per browser. With MLFLOW_TRACKING_URI naming a
server (team mode), nothing is started: the link points at that server.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline import cli, config, tracking
from pipeline.errors import PipelineError

HOST, DEFAULT_PORT = "127.0.0.1", 5000
START_TIMEOUT_S = 120  # the UI's first start builds its tables and can take a while on a busy machine


def runs_link(base_url: str, experiment_id: str | None) -> str:
    """The experiment's runs in the UI's training view; without an experiment, the list of experiments."""
    page = f"experiments/{experiment_id}/runs" if experiment_id else "experiments"
    return f"{base_url.rstrip('/')}/#/{page}?workflowType=machine_learning"


def experiment_id(uri: str, name: str) -> str | None:
    """The id of the experiment `name` at the server `uri` (MLflow's REST API); None when it does not exist yet."""
    query = urllib.parse.urlencode({"experiment_name": name})
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?{query}", headers=_auth())
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)["experiment"]["experiment_id"]
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise PipelineError(f"MLflow at {uri} answered {error.code} when asked for experiment {name!r}") from None
    except OSError as error:
        raise PipelineError(f"cannot reach MLflow at {uri}: {error}") from None


def _auth() -> dict[str, str]:
    """Basic auth from MLflow's own variables, for a team server with users (docs/team.md)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()}


def embedded_store(uri: str) -> Path:
    """The SQLite file behind `uri`; refuse a store that `mlflow ui` cannot open or that has no runs yet."""
    if not uri.startswith("sqlite:///"):
        raise PipelineError(f"cannot start the MLflow UI on {uri}: expected sqlite:///... or a server's http(s) URL")
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        raise PipelineError(f"no MLflow store at {db}: run `dvc repro` first")
    return db


def start(uri: str, port: int) -> subprocess.Popen:
    """`mlflow ui` on HOST:port over the store at `uri`, answering /health, or a PipelineError."""
    from pipeline import store

    db = embedded_store(uri)
    # One worker: one person browses, and the stages may be training beside it.
    network = ["--host", HOST, "--port", str(port), "--workers", "1"]
    stores = ["--backend-store-uri", uri, "--artifacts-destination", store.artifact_root(db)]
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", *stores, *network])
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PipelineError(f"mlflow ui exited with status {process.returncode} (is port {port} in use?)")
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2)
            return process
        except OSError:
            time.sleep(0.5)
    stop(process)
    raise PipelineError(f"mlflow ui did not answer on port {port} within {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen) -> None:
    """End the UI server, killing it if it does not stop within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def print_link(base_url: str, experiment: str) -> None:
    """The line a user clicks: the experiment's runs in the training view."""
    found = experiment_id(base_url, experiment)
    if found is None:
        print(f"warning: no experiment {experiment!r} at {base_url} yet: run `dvc repro` first")
    print(f"MLflow UI, experiment {experiment}: {runs_link(base_url, found)}", flush=True)


def serve(uri: str, port: int, experiment: str) -> None:
    """Start the UI, print the experiment's link, and keep serving until Ctrl-C or SIGTERM."""
    process = start(uri, port)
    try:
        print_link(f"http://{HOST}:{port}", experiment)
        status = process.wait()
    except KeyboardInterrupt:
        print("stopping the MLflow UI", file=sys.stderr)
        return
    finally:
        stop(process)
    if status != 0:
        raise PipelineError(f"mlflow ui exited with status {status}")


@cli.stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})")
    parser.add_argument("--experiment", help="experiment to link to (default: mlflow.experiment in params.yaml)")
    args = parser.parse_args()
    experiment = args.experiment or config.load(args.params).mlflow.experiment
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):  # a team server: its UI is already there
        print_link(uri, experiment)
        return
    serve(uri, args.port, experiment)


if __name__ == "__main__":
    main()
