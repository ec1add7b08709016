"""The CI workflow: actionlint passes, and it runs what the README says."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from tests.conftest import REPO, VENV_BIN

WORKFLOW = REPO / ".github/workflows/retrain.yml"


def actionlint(path) -> subprocess.CompletedProcess:
    binary = shutil.which("actionlint", path=str(VENV_BIN)) or "actionlint"
    return subprocess.run([binary, "-no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_workflow_passes_actionlint():
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github/workflows/broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("steps.report.outputs.status", "steps.reprot.outputs.status"))
    assert actionlint(broken).returncode != 0


def test_workflow_triggers_and_uses_the_readme_setup():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"push", "pull_request", "schedule", "workflow_dispatch"}
    assert {"params.yaml", "dvc.yaml", "pipeline/**"} <= set(triggers["pull_request"]["paths"])
    commands = " ".join(step.get("run", "") for step in workflow["jobs"]["retrain"]["steps"])
    assert "bin/setup" in commands and "dvc repro" in commands and "pipeline.ci_report" in commands
    assert "bin/setup" in (REPO / "README.md").read_text()
