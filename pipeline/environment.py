"""The environment a run was made in, as MLflow tags: which locked environment, and the versions that shape results.

Cheap on purpose: versions come from the installed packages' metadata, so nothing heavy is imported to ask."""

from __future__ import annotations

import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
LOCKS = {"dev.lock": "env.dev_lock_sha256", "run.lock": "env.run_lock_sha256"}
PACKAGES = ("torch", "mlflow", "dvc")
# bin/setup writes the sha256 of the lock it installed here: it tells whether this venv holds that lock.
INSTALLED_STAMP = Path(sys.prefix) / ".installed-from"


def run_tags(requirements: Path | None = None) -> dict[str, str]:
    """python, torch, mlflow and dvc versions; the sha256 of requirements/dev.lock and run.lock where present;
    and the digest of the lock bin/setup installed into this venv, if it did."""
    tags = {"env.python": platform.python_version()}
    tags.update({f"env.{package}": installed_version(package) for package in PACKAGES})
    folder = requirements or REQUIREMENTS
    for name, tag in LOCKS.items():
        if (folder / name).is_file():
            tags[tag] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    if INSTALLED_STAMP.is_file():
        tags["env.installed_lock_sha256"] = INSTALLED_STAMP.read_text().strip()
    return tags


def installed_version(package: str) -> str:
    """The installed distribution's version, or 'absent'."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
