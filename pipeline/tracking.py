"""MLflow for every stage: where runs go, how they are tagged, and runs that never stay RUNNING."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError

# MLflow retries an unreachable server for minutes by default; a stage should fail in seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store in the repo root, by absolute path."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


@contextmanager
def stage_run(stage: str, experiment: str, variant: str | None = None,
              run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage; ends FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM."""
    import mlflow

    uri = tracking_uri()
    tags = {"stage": stage, "git_commit": git_commit(), **({"variant": variant} if variant else {})}
    try:
        with _embedded_store_lock(uri):
            mlflow.set_tracking_uri(uri)
            _use_experiment(mlflow, experiment, uri)
        if run_id is None:
            run = mlflow.start_run(run_name=f"{stage}@{variant}" if variant else stage, tags=tags)
        else:  # a later stage adding to the run that produced its inputs
            run = mlflow.start_run(run_id=run_id)
            mlflow.set_tags({f"{stage}_git_commit": tags["git_commit"]})
    except Exception as error:  # noqa: BLE001 - any failure to reach the store is the same user problem
        raise PipelineError(f"MLflow tracking at {uri} failed: {_first_line(error)}") from None
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


@contextmanager
def _embedded_store_lock(uri: str) -> Iterator[None]:
    """Serialize first contact with an SQLite store: MLflow creates and migrates its tables then,
    and two stages doing that at once (dvc exp run --jobs 2, or two shells) corrupt the migration."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(uri.removeprefix("sqlite:///") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _use_experiment(mlflow: Any, name: str, uri: str) -> None:
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        # Keep artifacts beside the embedded store, not in whatever directory the stage runs from.
        store_dir = Path(uri.removeprefix("sqlite:///")).parent
        try:
            mlflow.create_experiment(name, artifact_location=(store_dir / "mlartifacts").as_uri())
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by a stage running beside this one
    mlflow.set_experiment(name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
