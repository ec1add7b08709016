"""Who may move the registry's `champion` alias: committed code on the default branch, the same on any CI.

A CI job is read from its provider's own variables (GitHub Actions, GitLab CI), so the rule does not depend on
one provider or on a branch named `main`. Outside CI a clean workspace run may promote (a user at their desk
decides what their champion is), unless RETRAIN_DEFAULT_BRANCH names a branch other than the one checked out.
No third-party imports: bin/ci-retrain imports this before the project is installed.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from pipeline.tracking import code_dirty

DEFAULT_BRANCH_SETTING = "RETRAIN_DEFAULT_BRANCH"  # overrides what the provider says the default branch is


@dataclass(frozen=True)
class CiRun:
    """What a CI job runs on: the branch pushed (None for a tag, a pull or merge request, or unknown), the default
    branch (None when unknown), and the request number when the job runs for a pull or merge request."""

    provider: str
    branch: str | None
    default_branch: str | None
    request: str | None = None
    target_branch: str | None = None


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _github() -> CiRun:
    """GitHub has no default-branch variable: the workflow passes github.event.repository.default_branch in."""
    ref = _env("GITHUB_REF") or ""
    request = ref.split("/")[2] if ref.startswith("refs/pull/") else None  # pull_request: refs/pull/<n>/merge
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    return CiRun("github", branch, _env(DEFAULT_BRANCH_SETTING), request, _env("GITHUB_BASE_REF"))


def _gitlab() -> CiRun:
    request = _env("CI_MERGE_REQUEST_IID")
    branch = None if request else _env("CI_COMMIT_BRANCH")  # unset for tags and merge request pipelines
    default = _env(DEFAULT_BRANCH_SETTING) or _env("CI_DEFAULT_BRANCH")
    return CiRun("gitlab", branch, default, request, _env("CI_MERGE_REQUEST_TARGET_BRANCH_NAME"))


def ci_run() -> CiRun | None:
    """The CI job this process runs in, from the provider's variables. Outside GitHub Actions and GitLab CI: the
    checked-out branch when RETRAIN_DEFAULT_BRANCH is set, else None (a workspace run)."""
    if _env("GITHUB_ACTIONS"):
        return _github()
    if _env("GITLAB_CI"):
        return _gitlab()
    if _env(DEFAULT_BRANCH_SETTING):
        return CiRun("git", current_branch(), _env(DEFAULT_BRANCH_SETTING))
    return None


def on_default_branch(run: CiRun) -> tuple[bool, str]:
    """Whether a CI job runs for a push to the default branch, and why not when it does not."""
    if run.request:
        return False, f"{run.provider} request {run.request}, not a push to the default branch"
    if run.default_branch is None:
        return False, f"{run.provider} run without a known default branch (set {DEFAULT_BRANCH_SETTING})"
    if run.branch != run.default_branch:
        return False, f"{run.provider} run on {run.branch or 'a tag or detached commit'}, not on {run.default_branch}"
    return True, f"{run.provider} run on the default branch {run.default_branch}"


def promotable() -> tuple[bool, str]:
    """Whether this run may move @champion: committed code and params, not a DVC experiment, and in CI only a
    push to the default branch. The reason is recorded with the registered version."""
    if _env("DVC_EXP_NAME"):
        return False, f"a DVC experiment ({os.environ['DVC_EXP_NAME']})"
    if code_dirty():
        return False, "code or params not committed"
    run = ci_run()
    if run is None:
        return True, "committed code and params, workspace run"
    allowed, why = on_default_branch(run)
    return allowed, f"committed code and params, {why}" if allowed else why


def current_branch() -> str | None:
    """The branch git has checked out, or None when detached or outside git."""
    try:
        result = subprocess.run(["git", "symbolic-ref", "-q", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() or None
