"""The embedded MLflow store (mlflow.db beside mlartifacts/ at the workspace root): where it is, its lock, and
its backups. It only reads MLflow's database (to back it up); MLflow alone writes into it.

    python -m pipeline.store backups            list the backups in .mlflow-backups/, oldest first
    python -m pipeline.store backup             take one now
    python -m pipeline.store restore [BACKUP]   check BACKUP (default: the newest) and put it in place of mlflow.db

Every stage backs the store up (SQLite's online backup API) before MLflow opens it, when the newest backup is
older than BACKUP_EVERY, so each `dvc repro` starts with a backup at most that old; the last KEEP are kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from pipeline.cli import stage_entry
from pipeline.errors import PipelineError, first_line

ARTIFACTS, BACKUPS = "mlartifacts", ".mlflow-backups"
BACKUP_EVERY, KEEP = timedelta(minutes=10), 5
STAMP = "%Y%m%dT%H%M%SZ"
BUSY_TIMEOUT_S = 20  # as long as MLflow itself waits for a locked store
T = TypeVar("T")
SIDE_FILES = ("-journal", "-wal", "-shm")  # SQLite's companions of a database file: they move with it


def workspace_root(start: Path | None = None) -> Path:
    """The user's repo: also from inside an experiment's copy (DVC runs --queue and --temp in .dvc/tmp/exps/...)
    and from a DVC subproject such as lessons/mnist (DVC_ROOT is then the subproject), so every lesson shares
    one store. That is the nearest folder holding .git; without git, where we started."""
    here = (start or Path(os.environ.get("DVC_ROOT") or Path.cwd())).resolve()
    for parent in (here, *here.parents):
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return next((parent for parent in (here, *here.parents) if (parent / ".git").exists()), here)


def embedded_db() -> Path:
    """The embedded store's file: mlflow.db at the workspace root."""
    return workspace_root() / "mlflow.db"


@contextmanager
def locked(db: Path) -> Iterator[None]:
    """Serialize first contact with an SQLite store: MLflow creates and migrates its tables then, and two stages
    doing that at once (dvc queue start -j 2, or two shells) corrupt the migration. Restore takes it too."""
    import fcntl

    try:
        lock = open(f"{db}.lock", "w")
    except OSError as error:
        raise PipelineError(
            f"MLflow tracking at sqlite:///{db} failed: cannot create the store: {error.strerror}"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def artifact_root(db: Path) -> str:
    """Where the experiments of the store at `db` keep their artifacts: mlartifacts/ beside it, as a file URI."""
    return (db.parent / ARTIFACTS).as_uri()


def backups(db: Path) -> list[Path]:
    """The backups of the store at `db`, oldest first."""
    return sorted(path for path in (db.parent / BACKUPS).glob("mlflow-*.db") if _taken(path) is not None)


def _taken(backup: Path) -> datetime | None:
    try:
        return datetime.strptime(backup.stem.removeprefix("mlflow-"), STAMP).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def backup(db: Path, now: datetime | None = None, keep: int = KEEP) -> Path:
    """Copy the store into .mlflow-backups/ with SQLite's online backup API (consistent while others write),
    check the copy, and keep only the newest `keep`."""
    target = db.parent / BACKUPS / f"mlflow-{(now or _now()):{STAMP}}.db"
    target.parent.mkdir(exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    try:
        with closing(_open_read_only(db)) as source, closing(sqlite3.connect(temp)) as copy:
            source.backup(copy)
            _check(copy, db, "quick_check")  # a broken store must not push a good backup out
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    for old in backups(db)[:-keep]:
        old.unlink()
    return target


def backup_if_due(db: Path, every: timedelta = BACKUP_EVERY) -> Path | None:
    """Back up the store when its newest backup is older than `every`; a failure is a warning, never an error."""
    taken = [_taken(path) for path in backups(db)]
    if not db.exists() or db.stat().st_size == 0 or (taken and timedelta(0) <= _now() - taken[-1] < every):
        return None  # (a newest backup from the future means the clock went back: take one)
    try:
        return backup(db)
    except (sqlite3.Error, OSError, PipelineError) as error:
        print(f"warning: could not back up the MLflow store {db}: {first_line(error)}")
        return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _open_read_only(db: Path) -> sqlite3.Connection:
    if not db.exists():
        raise PipelineError(f"{db} does not exist")
    return sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)


def _check(connection: sqlite3.Connection, name: Path, pragma: str = "integrity_check") -> None:
    """PipelineError unless SQLite finds the database sound."""
    try:
        problems = [row[0] for row in connection.execute(f"PRAGMA {pragma}")]
    except sqlite3.DatabaseError as error:
        problems = [str(error)]
    if problems != ["ok"]:
        raise PipelineError(f"{name} is damaged: {'; '.join(problems)[:300]}")


def newest_backup(db: Path) -> Path:
    found = backups(db)
    if not found:
        raise PipelineError(f"no backups of {db} in {db.parent / BACKUPS}")
    return found[-1]


def restore(db: Path, source: Path) -> Path | None:
    """Put a sound backup in place of the store. The store it replaces (with its journal, if any) moves aside
    to mlflow.db.broken-<time>, which is returned; None when there was no store."""
    with closing(_open_read_only(source)) as connection:
        _check(connection, source)
    temp = db.with_name(f".{db.name}.restoring")
    try:
        shutil.copyfile(source, temp)  # first: a full disk fails here, with the store untouched
        aside = db.with_name(f"{db.name}.broken-{_now():%Y%m%dT%H%M%S.%fZ}")
        for suffix in ("", *SIDE_FILES):  # a stale journal would be replayed into the restored store
            if Path(f"{db}{suffix}").exists():
                os.replace(f"{db}{suffix}", f"{aside}{suffix}")
        os.replace(temp, db)
    except OSError as error:
        raise PipelineError(f"cannot restore {db} from {source}: {error.strerror or error}") from None
    finally:
        temp.unlink(missing_ok=True)
    return aside if aside.exists() else None


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="the store (default: mlflow.db at the workspace root)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backups", help="list the backups, oldest first")
    commands.add_parser("backup", help="back the store up now")
    commands.add_parser("restore", help="replace the store by a backup").add_argument("backup", type=Path, nargs="?")
    args = parser.parse_args()
    db = (args.db or embedded_db()).resolve()
    if args.command == "backups":
        for path in backups(db):
            print(f"{path}  {path.stat().st_size:>12,d} bytes")
        if not backups(db):
            print(f"no backups of {db} in {db.parent / BACKUPS}")
    elif args.command == "backup":
        print(f"backed up {db} to {_plain_errors(backup, db)}")
    else:
        source = args.backup or newest_backup(db)
        with locked(db):  # no stage opens the store halfway through
            aside = _plain_errors(restore, db, source)
        print(f"restored {db} from {source}" + (f"; the store it replaced is {aside}" if aside else ""))


def _plain_errors(function: Callable[..., T], *args: Path) -> T:
    """SQLite's and the file system's errors as one PipelineError line."""
    try:
        return function(*args)
    except (sqlite3.Error, OSError) as error:
        raise PipelineError(f"{function.__name__} failed: {first_line(error)}") from None


if __name__ == "__main__":
    main()
