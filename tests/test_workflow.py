"""The CI definitions: actionlint passes the GitHub workflow, and both providers run the one job, bin/ci-retrain,
with the permissions and variables it needs."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from tests.conftest import REPO, VENV_BIN

WORKFLOW = REPO / ".github/workflows/retrain.yml"
GITLAB = REPO / ".gitlab-ci.yml"
RETRAIN_PATHS = {"params.yaml", "dvc.yaml", "dvc.lock", "requirements/run.lock", "bin/ci-retrain"}


def actionlint(path) -> subprocess.CompletedProcess:
    binary = shutil.which("actionlint", path=str(VENV_BIN)) or "actionlint"
    return subprocess.run([binary, "-no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_workflow_passes_actionlint():
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github/workflows/broken.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text()
    assert "github.event.repository.default_branch" in text
    broken.write_text(text.replace("github.event.repository.default_branch", "github.events.repository.default_branch"))
    assert actionlint(broken).returncode != 0


def test_workflow_runs_the_job_with_the_permissions_it_needs():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"push", "pull_request", "schedule", "workflow_dispatch"}
    assert RETRAIN_PATHS <= set(triggers["pull_request"]["paths"]) and RETRAIN_PATHS <= set(triggers["push"]["paths"])
    assert workflow["permissions"] == {"contents": "write", "pull-requests": "write"}
    job = workflow["jobs"]["retrain"]
    assert [step["run"] for step in job["steps"] if "run" in step] == ["bin/ci-retrain"]
    assert "default_branch" in job["env"]["RETRAIN_DEFAULT_BRANCH"] and "token" in job["env"]["GITHUB_TOKEN"]
    setup = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip" and setup["with"]["cache-dependency-path"] == "requirements/run.lock"
    checkout = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0


def test_gitlab_runs_the_same_job_on_merge_requests_and_the_default_branch():
    pipeline = yaml.safe_load(GITLAB.read_text())
    job = pipeline["retrain"]
    assert job["script"] == ["bin/ci-retrain"]
    assert job["variables"]["GIT_DEPTH"] == "0" and job["cache"]["paths"] == [".cache/pip"]
    assert job["variables"]["PIP_CACHE_DIR"] == "$CI_PROJECT_DIR/.cache/pip"
    assert RETRAIN_PATHS <= set(job["rules"][0]["changes"])
    conditions = " ".join(rule["if"] for rule in pipeline["workflow"]["rules"])
    assert "merge_request_event" in conditions and "$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH" in conditions
    assert ".ci-retrain/plots/" in job["artifacts"]["paths"] and job["artifacts"]["when"] == "always"


def test_the_job_is_executable_and_says_what_it_reads():
    script = REPO / "bin/ci-retrain"
    assert script.stat().st_mode & 0o111
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60).stdout
    for name in ("CI_RETRAIN_SKIP_SETUP", "CI_RETRAIN_TORCH_INDEX", "GITHUB_API_URL", "CI_API_V4_URL", "REPO_TOKEN"):
        assert name in help_text, name
