"""MLflow for every stage: where runs go, how they point back at DVC (lineage), and runs that never stay RUNNING."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError, first_line

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's training-runs view, not GenAI
CHAMPION_ALIAS, CHALLENGER_ALIAS = "champion", "challenger"  # the registry aliases compare moves (promotable())
# What a run's results depend on besides data: code and params. Not outputs, which a lesson may leave untracked
# (lessons/mnist is run by hand), nor DVC's dvc.lock. Git pathspecs, relative to the repo root.
CODE_PATHS = (
    ":(top)pipeline",
    ":(top,glob)lessons/**/*.py",
    ":(top,glob)lessons/**/params.yaml",
    ":(top,glob)lessons/**/dvc.yaml",
    ":(top)params.yaml",
    ":(top)dvc.yaml",
)


def _bound_http_retries() -> None:
    # MLflow retries an unreachable server for minutes by default; a stage should fail in seconds.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def workspace_root(start: Path | None = None) -> Path:
    """The user's repo: also from inside an experiment's copy (DVC runs --queue and --temp in .dvc/tmp/exps/...)
    and from a DVC subproject such as lessons/mnist (DVC_ROOT is then the subproject), so every lesson shares
    one store. That is the nearest folder holding .git; without git, where we started."""
    here = (start or Path(os.environ.get("DVC_ROOT") or Path.cwd())).resolve()
    for parent in (here, *here.parents):
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return next((parent for parent in (here, *here.parents) if (parent / ".git").exists()), here)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store at the workspace root, by absolute path."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace_root() / 'mlflow.db'}"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit() -> str:
    """The commit the code came from: an experiment's baseline, not DVC's temporary commit of its copy."""
    return os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "unknown"


def code_dirty() -> bool:
    """True when code or params differ from the commit (outputs, and DVC's dvc.lock, do not count)."""
    changed = _git("status", "--porcelain", "--untracked-files=normal", "--", *CODE_PATHS)
    return changed is None or changed != ""


def owner_tags() -> dict[str, str]:
    """Which process a run belongs to: close_orphans ends the runs of processes that are gone."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def lineage_tags(stage: str, variant: str | None = None) -> dict[str, str]:
    """What an MLflow run needs to find the DVC experiment, code and stage that made it."""
    tags = {"stage": stage, "git_commit": git_commit(), "git_dirty": str(code_dirty()).lower(), **owner_tags()}
    if variant:
        tags["variant"] = variant
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def promotable() -> tuple[bool, str]:
    """Whether this run may move @champion: committed code and params, not a DVC experiment, not CI off main."""
    if os.environ.get("DVC_EXP_NAME"):
        return False, f"a DVC experiment ({os.environ['DVC_EXP_NAME']})"
    ref = os.environ.get("GITHUB_REF")
    if os.environ.get("CI") and ref and ref != "refs/heads/main":
        return False, f"CI on {ref}, not on main"
    if code_dirty():
        return False, "code or params not committed"
    return True, "committed code and params, workspace run"


@contextmanager
def stage_run(stage: str, experiment: str, variant: str | None = None, run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage; ends FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM.
    A store error anywhere inside becomes one line naming the store."""
    import mlflow

    _bound_http_retries()
    uri = tracking_uri()
    _quiet_store_tracebacks()
    with store_errors(uri):
        with _embedded_store_lock(uri):
            _look_after_embedded_store(uri)
            mlflow.set_tracking_uri(uri)
            experiment_id = _use_experiment(mlflow, experiment, uri)
        close_orphans(experiment_id)
        if run_id is None:
            run = mlflow.start_run(
                run_name=f"{stage}@{variant}" if variant else stage, tags=lineage_tags(stage, variant)
            )
        else:  # a later stage adding to the run that produced its inputs: while it runs, the run is its own
            run = mlflow.start_run(run_id=run_id)
            mlflow.set_tags({f"{stage}_git_commit": git_commit(), **owner_tags()})
    with store_errors(uri), _ended(mlflow):  # a store error while ending the run is one line too
        yield run


@contextmanager
def child_run(name: str, tags: dict[str, str]) -> Iterator[Any]:
    """A nested run (one seed of a variant) under the active stage run; ends like its parent, and like it
    is closed by the next stage when its process is killed (owner_tags)."""
    import mlflow

    run = mlflow.start_run(run_name=name, nested=True, tags={**tags, **owner_tags()})
    with _ended(mlflow):
        yield run


@contextmanager
def _ended(mlflow: Any) -> Iterator[None]:
    """End the active run as its block ended: FINISHED, KILLED on Ctrl-C or SIGTERM, FAILED on an error."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        _end_run(mlflow, "KILLED")
        raise
    except BaseException as error:
        _end_run(mlflow, "FAILED", error)
        raise
    mlflow.end_run("FINISHED")


@contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """MLflow and database errors become one PipelineError line naming the store and the cause."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure inside the store is the same user problem
        if not _from_store(error):
            raise
        hint = _restore_hint(uri, error)
        raise PipelineError(f"MLflow tracking at {uri} failed: {_cause(error)}{hint}") from None


def _restore_hint(uri: str, error: BaseException) -> str:
    """For a damaged embedded store, the command that puts its newest backup back."""
    damaged = any(sign in str(error) for sign in ("malformed", "file is not a database"))
    return "; python -m pipeline.store restore puts back the newest backup" if damaged and _embedded_db(uri) else ""


def _from_store(error: BaseException) -> bool:
    module = type(error).__module__
    return module.startswith(("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3", "psycopg2"))


def _end_run(mlflow: Any, status: str, error: BaseException | None = None) -> None:
    """End the active run best-effort: the store may be what failed; the next stage closes what is left."""
    if error is not None and "database is locked" in str(error):
        # Another process holds the store: ending the run would wait out MLflow's 20 s busy timeout once more
        # per open run. Forget the run instead (MLflow's exit hook would otherwise end it FINISHED); it stays
        # RUNNING, and the next stage to reach the store ends it FAILED (close_orphans).
        from mlflow.tracking import fluent

        stack = fluent._active_run_stack.get()
        if stack:
            print(f"warning: left MLflow run {stack.pop().info.run_id} RUNNING: the store is locked")
        return
    try:
        mlflow.end_run(status)
    except Exception as failure:  # noqa: BLE001
        print(f"warning: could not end the MLflow run as {status}: {first_line(failure)}")


def close_orphans(experiment_id: str) -> None:
    """Runs left RUNNING by a process on this host that no longer exists (killed, or its store failed) end FAILED,
    in every experiment: the stage that reaches the store next may log elsewhere (a lesson, say)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    experiments = {experiment_id} | {experiment.experiment_id for experiment in client.search_experiments()}
    running = f"attributes.status = 'RUNNING' and tags.host = '{host}'"
    for run in client.search_runs(sorted(experiments), running, max_results=200):
        tags = run.data.tags
        if tags.get("host") == host and tags.get("pid", "").isdigit() and not _alive(int(tags["pid"])):
            client.set_terminated(run.info.run_id, "FAILED")
            print(f"closed MLflow run {run.info.run_id} ({run.info.run_name}): its process {tags['pid']} is gone")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_dataset(path: Path, name: str, digest: str, context: str) -> None:
    """The data a stage read as an MLflow dataset input: source is its path, digest its DVC hash."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # resolving a local path warns that it is not a registered source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(Path(path).as_posix())
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest[:36]), context=context)


def dvc_hash(path: Path, lock: Path = Path("dvc.lock")) -> str | None:
    """The hash DVC recorded for an output (e.g. data/prepared/fashion_mnist), from dvc.lock; None if absent."""
    import yaml

    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return None
    wanted = Path(path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == wanted:
                return out.get("md5")
    return None


def _embedded_db(uri: str) -> Path | None:
    """The SQLite file of the embedded store at the workspace root, when `uri` is that store."""
    db = workspace_root() / "mlflow.db"
    return db if uri == f"sqlite:///{db}" else None


def _look_after_embedded_store(uri: str) -> None:
    """Before MLflow opens the embedded store: back it up when due, and point it at this copy's mlartifacts/."""
    db = _embedded_db(uri)
    if db is None:
        return
    from pipeline import store

    store.backup_if_due(db)
    store.relocate(db)


def _quiet_store_tracebacks() -> None:
    """MLflow logs a traceback for every database error it raises; store_errors reports it in one line."""
    logger = logging.getLogger("mlflow.store.db.utils")
    logger.addFilter(_not_a_database_error_traceback)  # adding it again is a no-op


def _not_a_database_error_traceback(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("SQLAlchemy database error")


@contextmanager
def _embedded_store_lock(uri: str) -> Iterator[None]:
    """Serialize first contact with an SQLite store: MLflow creates and migrates its tables then,
    and two stages doing that at once (dvc queue start -j 2, or two shells) corrupt the migration."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    try:
        lock = open(uri.removeprefix("sqlite:///") + ".lock", "w")
    except OSError as error:
        raise PipelineError(f"MLflow tracking at {uri} failed: cannot create the store: {error.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _use_experiment(mlflow: Any, name: str, uri: str) -> str:
    """Create the experiment (artifacts beside an embedded store, tagged for the UI's training view); return its id."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise PipelineError(
            f"MLflow experiment {name!r} at {uri} is deleted; restore it (mlflow experiments "
            f"restore --experiment-id {experiment.experiment_id}) or choose another mlflow.experiment"
        )
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by a stage running beside this one
        experiment = mlflow.get_experiment_by_name(name)
    elif experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def _cause(error: BaseException) -> str:
    """The database's own error where SQLAlchemy wraps one: its first line can be advice about autoflush."""
    original = getattr(error, "orig", None)
    if isinstance(original, BaseException):
        return f"({type(original).__module__}.{type(original).__name__}) {first_line(original)}"
    return first_line(error)


@contextmanager
def child_runs(runs: dict[Any, tuple[str, dict[str, str]]]) -> Iterator[dict[Any, str]]:
    """Nested runs under the active stage run that stay open together (models trained as one batch): key ->
    run id. Each ends as the block ended, like child_run; a run the store cannot end is closed later
    (close_orphans: its tags name this process)."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = mlflow.active_run()
    run_ids = {
        key: client.create_run(
            parent.info.experiment_id, run_name=name, tags={**tags, "mlflow.parentRunId": parent.info.run_id}
        ).info.run_id
        for key, (name, tags) in runs.items()
    }
    status = "FAILED"
    try:
        yield run_ids
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        for run_id in run_ids.values():
            try:
                client.set_terminated(run_id, status)
            except Exception as failure:  # noqa: BLE001 - the next stage closes what is left
                print(f"warning: could not end MLflow run {run_id} as {status}: {first_line(failure)}")
