"""The committed dvc.lock matches the committed code and params: whoever changes a stage's code reruns it."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import yaml

from tests.conftest import REPO

LOCK = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"] if (REPO / "dvc.lock").exists() else {}


def tracked_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(listed.splitlines())


def locked_code() -> list[tuple[str, str, str]]:
    """(stage, path, md5) for every dependency in dvc.lock that git tracks (code and params files)."""
    tracked = tracked_files()
    return [
        (stage, dep["path"], dep["md5"])
        for stage, entry in LOCK.items()
        for dep in entry.get("deps", [])
        if dep["path"] in tracked and "md5" in dep
    ]


@pytest.mark.parametrize("stage, path, md5", locked_code(), ids=[f"{s}:{p}" for s, p, _ in locked_code()])
def test_locked_code_is_the_code_in_the_repo(stage, path, md5):
    assert hashlib.md5((REPO / path).read_bytes()).hexdigest() == md5, (
        f"{path} changed since dvc.lock recorded {stage}: run `dvc repro` and commit dvc.lock with its results"
    )


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {key: leaf for name, item in value.items() for key, leaf in flatten(item, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


def test_locked_params_are_the_params_in_the_repo():
    stale = []
    for stage, entry in LOCK.items():
        for params_file, values in entry.get("params", {}).items():
            current = flatten(yaml.safe_load((REPO / params_file).read_text()))
            for key, value in flatten(values).items():
                if current.get(key, "<missing>") != value and not any(k.startswith(key + ".") for k in current):
                    stale.append(f"{stage}: {params_file} {key} is {current.get(key, '<missing>')!r}, locked {value!r}")
    assert not stale, "params changed since dvc.lock; run `dvc repro` and commit dvc.lock:\n" + "\n".join(stale)


def test_every_stage_of_the_pipeline_is_locked():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    expected = {name for name, stage in stages.items() if "foreach" not in stage}
    expected |= {
        f"{name}@{variant}" for name, stage in stages.items() if "foreach" in stage for variant in params["variants"]
    }
    assert set(LOCK) == expected
