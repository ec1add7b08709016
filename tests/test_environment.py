"""What every run records of its environment, and that this venv holds the lock it claims."""

from __future__ import annotations

import hashlib
import platform
import re
import subprocess
import sys

import pytest
import torch
from packaging.markers import Marker
from packaging.requirements import Requirement

from pipeline import environment
from tests.conftest import REPO, tool_env

SHA256_OF_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2's test vector


def test_versions_are_the_running_ones():
    tags = environment.run_tags()
    assert tags["env.python"] == platform.python_version() == ".".join(map(str, sys.version_info[:3]))
    assert tags["env.torch"] == torch.__version__.split("+")[0]  # the release; torch adds its build (+cu130)
    assert re.fullmatch(r"3\.\d+\.\d+.*", tags["env.mlflow"]) and re.fullmatch(r"3\.\d+\.\d+.*", tags["env.dvc"])


def test_a_missing_package_is_absent_not_an_error():
    assert environment.installed_version("no-such-distribution-d2l") == "absent"


def test_each_lock_present_is_named_with_its_digest(tmp_path):
    (tmp_path / "dev.lock").write_bytes(b"abc")
    tags = environment.run_tags(tmp_path)
    assert tags["env.dev_lock_sha256"] == SHA256_OF_ABC and "env.run_lock_sha256" not in tags
    (tmp_path / "run.lock").write_bytes(b"abd")
    tags = environment.run_tags(tmp_path)
    assert tags["env.dev_lock_sha256"] == SHA256_OF_ABC
    assert tags["env.run_lock_sha256"] == hashlib.sha256(b"abd").hexdigest() != SHA256_OF_ABC


def test_the_repos_locks_by_default():
    tags = environment.run_tags()
    for name in ("dev.lock", "run.lock"):
        expected = hashlib.sha256((REPO / "requirements" / name).read_bytes()).hexdigest()
        assert tags[f"env.{name.replace('.', '_')}_sha256"] == expected


def test_the_installed_lock_comes_from_setups_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "INSTALLED_STAMP", tmp_path / ".installed-from")
    assert "env.installed_lock_sha256" not in environment.run_tags()
    (tmp_path / ".installed-from").write_text(SHA256_OF_ABC + "\n")
    assert environment.run_tags()["env.installed_lock_sha256"] == SHA256_OF_ABC


@pytest.mark.integration
def test_asking_imports_nothing_heavy():
    script = (
        "import sys; from pipeline import environment; environment.run_tags(); "
        "print(sorted(name for name in ('torch', 'mlflow', 'dvc', 'numpy') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def locked_versions(lock: str) -> dict[str, str]:
    """name -> version of every line of the lock whose marker holds for this interpreter."""
    pins = {}
    for line in lock.splitlines():
        found = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*(?:;\s*(.*?))?\s*\\?$", line)
        if found and (found[3] is None or Marker(found[3]).evaluate()):
            pins[re.sub(r"[-_.]+", "-", found[1]).lower()] = found[2]
    return pins


def test_this_venv_holds_exactly_the_dev_lock():
    """bin/setup's promise: every package at the lock's version, nothing else but pip and the project."""
    lock = (REPO / "requirements" / "dev.lock").read_text()
    stamp = environment.INSTALLED_STAMP
    if not stamp.is_file():
        pytest.skip(f"{sys.prefix} was not made by bin/setup")
    assert stamp.read_text().strip() == hashlib.sha256(lock.encode()).hexdigest(), "the lock changed: run bin/setup"
    from importlib import metadata

    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in metadata.distributions()}
    installed = {name: version for name, version in installed.items() if name not in ("pip", "d2l-mlp-pipeline")}
    pins = locked_versions(lock)
    differ = {name: (installed.get(name), pins.get(name)) for name in installed.keys() | pins.keys()}
    differ = {name: versions for name, versions in differ.items() if versions[0] != versions[1]}
    assert not differ, f"(installed, locked) differ; bin/setup installs the lock: {differ}"


def pyproject_requirements(*extras: str) -> list[Requirement]:
    """The project's dependencies and those of the named extras, as pyproject.toml states them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *(line for extra in extras for line in project["optional-dependencies"][extra])]
    return [Requirement(line) for line in names]


@pytest.mark.parametrize("lock, extras", [("run.lock", ()), ("dev.lock", ("test", "team", "ray"))])
def test_each_lock_pins_what_pyproject_asks_within_its_ranges(lock, extras):
    pins = locked_versions((REPO / "requirements" / lock).read_text())
    for requirement in pyproject_requirements(*extras):
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins and requirement.specifier.contains(pins[name], prereleases=True), (lock, str(requirement))
    assert ("pytest" in pins, "ray" in pins) == (lock == "dev.lock", lock == "dev.lock")


def test_the_committed_results_versions_are_pinned_for_every_python():
    for lock in ("run.lock", "dev.lock"):
        text = (REPO / "requirements" / lock).read_text()
        for name, version in {"torch": "2.14.1", "torchvision": "0.29.1", "mlflow": "3.17.2", "dvc": "3.67.1"}.items():
            assert set(re.findall(rf"(?m)^{name}==(\S+) ;", text)) == {version}, (lock, name)


def test_the_pip_locks_are_exports_of_uvs_lock():
    """A hand edit of run.lock or dev.lock shows: every pin and hash there is in requirements/uv.lock."""
    uv_lock = (REPO / "requirements" / "uv.lock").read_text()
    locked = set(re.findall(r'(?m)^name = "([^"]+)"\nversion = "([^"]+)"', uv_lock))
    for lock in ("run.lock", "dev.lock"):
        text = (REPO / "requirements" / lock).read_text()
        pins = set(re.findall(r"(?m)^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", text))
        assert pins and pins <= locked, pins - locked
        assert set(re.findall(r"--hash=sha256:([0-9a-f]{64})", text)) <= set(
            re.findall(r"sha256:([0-9a-f]{64})", uv_lock)
        )
