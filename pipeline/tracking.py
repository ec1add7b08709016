"""MLflow for every stage: where runs go, how they point back at DVC (lineage), and runs that never stay RUNNING."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import cli, store
from pipeline.errors import PipelineError, first_line

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's training-runs view, not GenAI
CHAMPION_ALIAS, CHALLENGER_ALIAS = "champion", "challenger"  # the registry aliases compare moves
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


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite store at the workspace root, by absolute path."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.embedded_db()}"


def check_reachable(timeout_s: float = 10.0) -> None:
    """Fail in seconds, before any work, when the tracking server does not answer: a stage logs only once its
    figures exist, and minutes of training should not end in an unreachable store. Local stores need no check."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a server behind authentication may refuse /health): the store is there
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise PipelineError(f"MLflow tracking at {uri} failed: the server does not answer ({reason})") from None


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
    """Which process a run belongs to, so that close_orphans can end the runs of processes that are gone: this
    machine's boot (boot_id), the pid and that pid's start time name one process that no other machine, and no
    later process here, can share. The host name is for people: two machines may share it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid": str(pid), "pid_started": process_started(pid)}


def boot_id() -> str:
    """This boot of this machine: Linux's random boot id, with the pid namespace (containers on one host share the
    boot id but not their pids); elsewhere the boot time to the microsecond (macOS: sysctl kern.boottime)."""
    if sys.platform != "linux":
        import psutil  # a dependency of dvc; on macOS it reads kern.boottime

        return f"boot-time {psutil.boot_time()!r}"
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    try:
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return boot


def process_started(pid: int) -> str | None:
    """When process `pid` started, exactly as the system counts it; None when there is no such process. Linux:
    field 22 of /proc/<pid>/stat (clock ticks since boot); elsewhere psutil's creation time (macOS: p_starttime)."""
    if sys.platform != "linux":
        return _psutil_started(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # fields from the third on follow the command's last ')'


def _psutil_started(pid: int) -> str | None:
    import psutil

    try:
        return repr(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def lineage_tags(stage: str, variant: str | None = None) -> dict[str, str]:
    """What an MLflow run needs to find the DVC experiment, code, environment and stage that made it."""
    from pipeline.environment import run_tags

    tags = {"stage": stage, "git_commit": git_commit(), "git_dirty": str(code_dirty()).lower(), **owner_tags()}
    tags.update(run_tags())  # the lock's digest and the versions of python, torch, mlflow and dvc
    if variant:
        tags["variant"] = variant
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


@contextmanager
def logged_run(stage: str, experiment: str, variant: str | None = None, run_id: str | None = None) -> Iterator[Any]:
    """One stage's MLflow run opened, logged and ended in one short step once its figures exist, with SIGINT and
    SIGTERM held throughout (cli.signals_held): no store call is cut short, and a signal that arrived meanwhile
    ends the run KILLED and is raised when the step ends. Ends FAILED on an error; store errors are one line."""
    with cli.signals_held(), stage_run(stage, experiment, variant, run_id) as run:
        yield run


@contextmanager
def stage_run(stage: str, experiment: str, variant: str | None = None, run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run for one stage; ends FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM. Opening and
    ending it hold signals; calls in the block do not: log inside logged_run instead where the block is not long
    work. `run_id` continues the run that produced a later stage's inputs. A store error is one line."""
    import mlflow

    _bound_http_retries()
    uri = tracking_uri()
    _quiet_store_tracebacks()
    with store_errors(uri), _run_ended(mlflow, lambda: _start(mlflow, uri, stage, experiment, variant, run_id)) as run:
        yield run


def _start(mlflow: Any, uri: str, stage: str, experiment: str, variant: str | None, run_id: str | None) -> Any:
    """Open the store (backup, lock, this store's own experiment), end orphans, and start the stage's run."""
    db = _embedded_db(uri)
    with _first_contact(uri):
        if db is not None:
            store.backup_if_due(db)
        mlflow.set_tracking_uri(uri)
        experiment_id = _use_experiment(mlflow, experiment, uri)
    close_orphans(experiment_id)
    if run_id is not None:  # a later stage adding to the run that made its inputs: while it runs, the run is its own
        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags({f"{stage}_git_commit": git_commit(), **owner_tags()})
        return run
    return mlflow.start_run(run_name=f"{stage}@{variant}" if variant else stage, tags=lineage_tags(stage, variant))


@contextmanager
def child_run(name: str, tags: dict[str, str]) -> Iterator[Any]:
    """A nested run (one seed of a variant) under the active stage run; ends like its parent, and like it
    is closed by the next stage when its process is killed (owner_tags)."""
    import mlflow

    with _run_ended(mlflow, lambda: mlflow.start_run(run_name=name, nested=True, tags={**tags, **owner_tags()})) as run:
        yield run


@contextmanager
def _run_ended(mlflow: Any, start: Callable[[], Any]) -> Iterator[Any]:
    """Start a run with signals held, and end it as its block ended: FINISHED; KILLED on Ctrl-C or SIGTERM (also
    one held until now); FAILED on an error. A run that never started is not ended."""
    run = None
    try:
        with cli.signals_held():
            run = start()
        yield run
    except (KeyboardInterrupt, SystemExit):
        if run is not None:
            _end_run(mlflow, "KILLED")
        raise
    except BaseException:
        if run is not None:
            _end_run(mlflow, "FAILED")
        raise
    _end_run(mlflow, "FINISHED")


def _end_run(mlflow: Any, status: str) -> None:
    """End the active run with signals held, best-effort: the store may be what failed, and then the run stays
    RUNNING until the next stage that reaches the store ends it FAILED (close_orphans)."""
    with cli.signals_held():
        if status == "FINISHED" and cli.interrupt_pending():
            status = "KILLED"
        try:
            mlflow.end_run(status)
        except Exception as failure:  # noqa: BLE001
            print(f"warning: could not end the MLflow run as {status}: {first_line(failure)}; the next stage ends it")


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


def close_orphans(experiment_id: str) -> None:
    """Runs left RUNNING by a process of this machine's boot that no longer exists (killed, or its store failed)
    end FAILED, in every experiment: the stage that reaches the store next may log elsewhere (a lesson, say).
    A run of another machine, or one without these tags, is never touched."""
    from mlflow import MlflowClient

    client = MlflowClient()
    machine = boot_id()
    experiments = {experiment_id} | {experiment.experiment_id for experiment in client.search_experiments()}
    running = f"attributes.status = 'RUNNING' and tags.boot_id = '{machine}'"
    for run in client.search_runs(sorted(experiments), running, max_results=200):
        if orphaned(run.data.tags, machine):
            client.set_terminated(run.info.run_id, "FAILED")
            pid = run.data.tags["pid"]
            print(f"closed MLflow run {run.info.run_id} ({run.info.run_name}): its process {pid} is gone")


def orphaned(tags: dict[str, str], machine: str) -> bool:
    """Whether owner_tags name a process of this boot that is gone: its pid is free, or taken by a later process."""
    pid = tags.get("pid", "")
    return tags.get("boot_id") == machine and pid.isdigit() and process_started(int(pid)) != tags.get("pid_started")


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
    db = store.embedded_db()
    return db if uri == f"sqlite:///{db}" else None


def _quiet_store_tracebacks() -> None:
    """MLflow logs a traceback for every database error it raises; store_errors reports it in one line."""
    logger = logging.getLogger("mlflow.store.db.utils")
    logger.addFilter(_not_a_database_error_traceback)  # adding it again is a no-op


def _not_a_database_error_traceback(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("SQLAlchemy database error")


@contextmanager
def _first_contact(uri: str) -> Iterator[None]:
    """An SQLite store's first contact, under its lock (store.locked); any other store's as it is."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with store.locked(Path(uri.removeprefix("sqlite:///"))):
        yield


def _use_experiment(mlflow: Any, name: str, uri: str) -> str:
    """This store's experiment `name` (artifacts beside an SQLite store, tagged for the UI's training view),
    created when missing; return its id."""
    location = store.artifact_root(Path(uri.removeprefix("sqlite:///"))) if uri.startswith("sqlite:///") else None
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise PipelineError(
            f"MLflow experiment {name!r} at {uri} is deleted; restore it (mlflow experiments "
            f"restore --experiment-id {experiment.experiment_id}) or choose another mlflow.experiment"
        )
    if experiment is not None and location is not None and _logged_elsewhere(experiment.artifact_location, location):
        _set_aside(mlflow, experiment, location)
        experiment = None
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by a stage running beside this one
        experiment = mlflow.get_experiment_by_name(name)
    elif experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def _logged_elsewhere(artifact_location: str, location: str) -> bool:
    """Whether an experiment keeps its artifacts in the mlartifacts/ of another copy of this store: made by our
    stages beside a store that has since been copied or moved. Locations a user chose are left as they are."""
    root = artifact_location.rstrip("/")
    return root.startswith("file:///") and root.endswith("/" + store.ARTIFACTS) and root != location


def _set_aside(mlflow: Any, experiment: Any, location: str) -> None:
    """Rename an experiment logged in another copy of the store, so that a new one of the same name logs beside
    this copy. MLflow keeps absolute artifact paths, so its runs still read their files from where they were
    logged; nothing is written there."""
    logged_in = experiment.artifact_location.rstrip("/").removeprefix("file://").removesuffix("/" + store.ARTIFACTS)
    new_name = f"{experiment.name} (logged in {logged_in}, id {experiment.experiment_id})"
    mlflow.MlflowClient().rename_experiment(experiment.experiment_id, new_name)
    print(
        f"MLflow experiment {experiment.name!r} keeps its artifacts in another copy of this store "
        f"({experiment.artifact_location}): renamed it {new_name!r}; new runs go to {location}"
    )


def _cause(error: BaseException) -> str:
    """The database's own error where SQLAlchemy wraps one: its first line can be advice about autoflush."""
    original = getattr(error, "orig", None)
    if isinstance(original, BaseException):
        return f"({type(original).__module__}.{type(original).__name__}) {first_line(original)}"
    return first_line(error)


@contextmanager
def child_runs(runs: dict[Any, tuple[str, dict[str, str]]]) -> Iterator[dict[Any, str]]:
    """Nested runs under the active stage run that stay open together (models trained as one batch): key ->
    run id. Each ends as the block ended, like child_run, with signals held while they start and end; a run the
    store cannot end is closed later (close_orphans: its tags name this process)."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = mlflow.active_run()
    run_ids: dict[Any, str] = {}
    status = "FAILED"
    try:
        with cli.signals_held():
            for key, (name, tags) in runs.items():
                tags = {**tags, **owner_tags(), "mlflow.parentRunId": parent.info.run_id}
                run_ids[key] = client.create_run(parent.info.experiment_id, run_name=name, tags=tags).info.run_id
        yield run_ids
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        with cli.signals_held():
            status = "KILLED" if cli.interrupt_pending() else status
            for run_id in run_ids.values():
                try:
                    client.set_terminated(run_id, status)
                except Exception as failure:  # noqa: BLE001 - the next stage closes what is left
                    print(f"warning: could not end MLflow run {run_id} as {status}: {first_line(failure)}")
