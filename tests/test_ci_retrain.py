"""The CI retraining job end to end (bin/ci-retrain), with the variables GitHub Actions or GitLab CI would set.

Real parts throughout: a bare git repository as origin, a directory as the DVC remote, `dvc repro` on tiny data,
an SQLite MLflow store with its registry. The one stand-in is the provider's REST API: a small recording HTTP
server on 127.0.0.1 that answers like GitHub or GitLab would. One module fixture per provider plays the story
once (a push to the default branch, a second push after the results are merged, a request from a feature
branch, that request again, and from a fork) and records what each step showed; each test only reads the record.
The promotion rule's own cases run without any process at the top of the file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import promotion
from tests.conftest import REPO, commit_all, copy_repo, edit_params, run_tool, tiny_params, tool_env

EXPERIMENT, MODEL = "d2l-ci", "ci-mlp"
MARKER = "<!-- ci-retrain report -->"
PROVIDER_PREFIXES = ("GITHUB_", "GITLAB_", "CI_", "RUNNER_", "RETRAIN_", "DVC_EXP")


# The promotion rule, from each provider's variables ---------------------------------------------------------------


@pytest.fixture
def clean_repo(tmp_path, monkeypatch):
    """A committed git repo as the working directory, with no CI variables from whatever runs the tests."""
    for name in list(os.environ):
        if name.startswith(PROVIDER_PREFIXES) or name == "CI":
            monkeypatch.delenv(name)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    commit_all(tmp_path, "first")
    monkeypatch.chdir(tmp_path)
    return tmp_path


GITHUB_PUSH = {"GITHUB_ACTIONS": "true", "GITHUB_REF": "refs/heads/main", "RETRAIN_DEFAULT_BRANCH": "main"}
GITLAB_PUSH = {"GITLAB_CI": "true", "CI_COMMIT_BRANCH": "main", "CI_DEFAULT_BRANCH": "main"}


@pytest.mark.parametrize("variables", [GITHUB_PUSH, GITLAB_PUSH], ids=["github", "gitlab"])
def test_a_push_to_the_default_branch_may_promote(clean_repo, monkeypatch, variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    allowed, why = promotion.promotable()
    assert allowed and "default branch main" in why


@pytest.mark.parametrize(
    "variables",
    [
        {**GITHUB_PUSH, "GITHUB_REF": "refs/heads/feature"},
        {**GITHUB_PUSH, "GITHUB_REF": "refs/pull/7/merge", "GITHUB_BASE_REF": "main"},
        {**GITHUB_PUSH, "GITHUB_REF": "refs/tags/v1"},
        {**GITHUB_PUSH, "RETRAIN_DEFAULT_BRANCH": ""},  # the workflow did not say which branch is the default
        {**GITLAB_PUSH, "CI_COMMIT_BRANCH": "feature"},
        {"GITLAB_CI": "true", "CI_DEFAULT_BRANCH": "main", "CI_MERGE_REQUEST_IID": "3"},  # no CI_COMMIT_BRANCH
        {"GITLAB_CI": "true", "CI_DEFAULT_BRANCH": "main", "CI_COMMIT_TAG": "v1"},
        {**GITLAB_PUSH, "CI_DEFAULT_BRANCH": "trunk"},  # not named main: GitLab says which is the default
    ],
    ids=["gh-branch", "gh-pull", "gh-tag", "gh-unknown", "gl-branch", "gl-merge-request", "gl-tag", "gl-trunk"],
)
def test_anything_but_a_push_to_the_default_branch_does_not(clean_repo, monkeypatch, variables):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    allowed, why = promotion.promotable()
    assert not allowed and why


def test_the_setting_overrides_the_provider_and_applies_outside_ci(clean_repo, monkeypatch):
    monkeypatch.setenv("GITLAB_CI", "true")
    monkeypatch.setenv("CI_COMMIT_BRANCH", "trunk")
    monkeypatch.setenv("CI_DEFAULT_BRANCH", "main")
    monkeypatch.setenv("RETRAIN_DEFAULT_BRANCH", "trunk")
    assert promotion.promotable()[0]
    monkeypatch.delenv("GITLAB_CI")  # outside CI the setting is compared with the checked-out branch (main)
    assert promotion.promotable() == (False, "git run on main, not on trunk")
    monkeypatch.delenv("RETRAIN_DEFAULT_BRANCH")
    assert promotion.promotable() == (True, "committed code and params, workspace run")


def test_dirty_code_or_an_experiment_never_promotes_even_on_the_default_branch(clean_repo, monkeypatch):
    for name, value in GITLAB_PUSH.items():
        monkeypatch.setenv(name, value)
    (clean_repo / "params.yaml").write_text("a: 2\n")
    assert promotion.promotable() == (False, "code or params not committed")
    commit_all(clean_repo, "second")
    monkeypatch.setenv("DVC_EXP_NAME", "lr-02")
    assert promotion.promotable() == (False, "a DVC experiment (lr-02)")


# The provider's API: a recorder ------------------------------------------------------------------------------------


class Recorder(ThreadingHTTPServer):
    """Answers the few GitHub and GitLab REST calls the job makes, keeping comments and requests it was sent."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.calls: list[dict] = []
        self.comments: list[dict] = []
        self.requests: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RecorderHandler(BaseHTTPRequestHandler):
    timeout = 30  # a client that stalls cannot hold the test

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.answer()

    do_POST = do_PATCH = do_PUT = do_GET

    def answer(self):
        server: Recorder = self.server
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if self.headers.get("Content-Type") == "application/json" else None
        headers = {name.lower(): value for name, value in self.headers.items()}
        server.calls.append({"method": self.command, "path": self.path, "body": body, "headers": headers})
        self.reply(self.route(server, self.path.split("?")[0], body, raw))

    def route(self, server: Recorder, path: str, body: dict | None, raw: bytes):
        if path.endswith("/uploads"):
            name = re.search(rb'filename="([^"]+)"', raw).group(1).decode()
            return {"markdown": f"![{name}](/uploads/0123abcd/{name})", "url": f"/uploads/0123abcd/{name}"}
        if path.endswith(("/comments", "/notes")):
            if self.command == "GET":
                return server.comments
            server.comments.append({"id": len(server.comments) + 1, "body": body["body"]})
            return server.comments[-1]
        if path.endswith(("/pulls", "/merge_requests")):
            if self.command == "GET":
                return server.requests
            number = len(server.requests) + 1
            server.requests.append({"number": number, "iid": number, "html_url": "u", "web_url": "u", **body})
            return server.requests[-1]
        return {}

    def reply(self, value):
        data = json.dumps(value).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def recorder():
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# The job, end to end ------------------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return run_tool(["git", *args], repo).stdout.strip()


def provider_env(provider: str, api: str, head: str, summary: Path, **extra: str) -> dict:
    """What the provider's runner would set for a job at commit `head` (a push unless `extra` says otherwise)."""
    if provider == "github":
        variables = {
            "GITHUB_ACTIONS": "true",
            "GITHUB_API_URL": api,
            "GITHUB_SERVER_URL": "https://github.example",
            "GITHUB_REPOSITORY": "team/mlp",
            "GITHUB_REF": "refs/heads/main",
            "GITHUB_SHA": head,
            "GITHUB_RUN_ID": "99",
            "GITHUB_TOKEN": "gh-token",
            "GITHUB_STEP_SUMMARY": str(summary),
            "RETRAIN_DEFAULT_BRANCH": "main",  # github.event.repository.default_branch, passed in by the workflow
        }
    else:
        variables = {
            "GITLAB_CI": "true",
            "CI_API_V4_URL": f"{api}/api/v4",
            "CI_PROJECT_ID": "42",
            "CI_PROJECT_PATH": "team/mlp",
            "CI_COMMIT_BRANCH": "main",
            "CI_COMMIT_SHA": head,
            "CI_DEFAULT_BRANCH": "main",
            "REPO_TOKEN": "gl-token",
        }
    env = {name: value for name, value in tool_env().items() if not name.startswith(PROVIDER_PREFIXES)}
    return {**env, "CI": "true", "CI_RETRAIN_SKIP_SETUP": "1", **variables, **extra}


def request_env(provider: str, tmp: Path, fork: bool = False) -> dict:
    """The variables of a job for request 7 from branch `feature` into main (from a fork when `fork`)."""
    if provider == "github":
        event = tmp / f"event-{fork}.json"
        head_repo = "someone/mlp" if fork else "team/mlp"
        payload = {"pull_request": {"number": 7, "head": {"repo": {"full_name": head_repo}}}}
        event.write_text(json.dumps({**payload, "repository": {"full_name": "team/mlp"}}))
        return {"GITHUB_REF": "refs/pull/7/merge", "GITHUB_BASE_REF": "main", "GITHUB_EVENT_PATH": str(event)}
    return {
        "CI_COMMIT_BRANCH": "",
        "CI_MERGE_REQUEST_IID": "7",
        "CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main",
        "CI_MERGE_REQUEST_PROJECT_ID": "42",
        "CI_MERGE_REQUEST_SOURCE_PROJECT_ID": "1042" if fork else "42",
    }


def checkout(origin: Path, destination: Path, branch: str) -> Path:
    """What the runner starts from: a fresh clone of origin at `branch`, nothing else."""
    run_tool(["git", "clone", "-q", "--branch", branch, str(origin), str(destination)], origin.parent)
    return destination


def ci_retrain(checkout_dir: Path, env: dict) -> subprocess.CompletedProcess:
    return run_tool([sys.executable, "bin/ci-retrain"], checkout_dir, env, check=False, timeout=900)


def remote_branches(origin: Path) -> dict[str, str]:
    listed = git(origin, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split() for line in listed.splitlines())


REGISTRY_QUERY = """
import json, sys
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
client, aliases = MlflowClient(tracking_uri=sys.argv[1]), {}
for alias in ("champion", "challenger"):
    try:
        aliases[alias] = client.get_model_version_by_alias(sys.argv[2], alias).version
    except MlflowException:
        aliases[alias] = None
print(json.dumps(aliases))
"""


def registry(uri: str) -> dict[str, str | None]:
    """Which version each alias points at, read by a fresh process as another user would read it (a client in
    the test process once missed the alias the job had just set; the cause was not found)."""
    result = run_tool([sys.executable, "-c", REGISTRY_QUERY, uri, MODEL], REPO)
    return json.loads(result.stdout.strip().splitlines()[-1])


def new_calls(recorder: Recorder, since: int) -> list[dict]:
    return [call for call in recorder.calls[since:] if call["method"] != "GET"]


def origin_with_remote(tmp: Path, tiny_dataset: dict) -> tuple[Path, Path]:
    """A bare origin whose main holds the project on tiny data, and the DVC remote (a directory) it names."""
    work = copy_repo(tmp / "work")
    git(work, "branch", "-M", "main")
    edit_params(work, tiny_params(tiny_dataset))
    edit_params(work, lambda params: params["mlflow"].update(experiment=EXPERIMENT, registered_model=MODEL))
    edit_params(work, lambda params: params["variants"].pop("exploding"))  # a clean PASS: the job exits 0
    storage = tmp / "dvc-remote"
    run_tool(["dvc", "remote", "add", "-d", "storage", str(storage)], work)
    commit_all(work, "tiny params and a DVC remote")
    origin = tmp / "origin.git"
    run_tool(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp)
    git(work, "push", "-q", str(origin), "main")
    return origin, work


@pytest.fixture(scope="module", params=["github", "gitlab"])
def story(request, tmp_path_factory, tiny_dataset, recorder):
    provider, tmp = request.param, tmp_path_factory.mktemp(f"ci-{request.param}")
    origin, work = origin_with_remote(tmp, tiny_dataset)
    uri, start = f"sqlite:///{tmp / 'mlflow.db'}", len(recorder.calls)
    recorder.comments.clear()
    recorder.requests.clear()
    record: dict = {"provider": provider, "origin": origin, "tmp": tmp}

    def run_job(name: str, branch: str, runner: Path | None = None, **extra: str) -> dict:
        """One job on a fresh checkout of `branch` (or again in `runner`); what it printed, sent and left."""
        runner = runner or checkout(origin, tmp / name, branch)
        summary, since = tmp / f"{name}-summary.md", len(recorder.calls)
        env = provider_env(provider, recorder.url, git(runner, "rev-parse", "HEAD"), summary, **extra)
        started = time.monotonic()
        result = ci_retrain(runner, {**env, "MLFLOW_TRACKING_URI": uri})
        print(f"{provider} {name}: {time.monotonic() - started:.0f} s")
        return {
            "result": result,
            "runner": runner,
            "sent": new_calls(recorder, since),
            "branches": remote_branches(origin),
            "registry": registry(uri),
            "summary": summary.read_text() if summary.exists() else "",
        }

    record["main"] = run_job("push-main", "main")
    record["main_sha"] = git(origin, "rev-parse", "main")
    results_branch = next((name for name in record["main"]["branches"] if name.startswith("retrain/")), None)
    record["results_branch"] = results_branch
    if results_branch:  # what a reviewer gets: a checkout of the results, with the data from the DVC remote
        check = checkout(origin, tmp / "review", results_branch)
        record["review_pull"] = run_tool(["dvc", "pull"], check, check=False)
        record["review_status"] = run_tool(["dvc", "status", "dvc.yaml"], check, check=False)
        record["review_files"] = git(check, "show", "--name-only", "--format=", "HEAD").splitlines()
        git(origin, "update-ref", "refs/heads/main", record["main"]["branches"][results_branch])  # the merge
    record["merged"] = run_job("push-merged", "main")
    feature = checkout(origin, tmp / "feature-branch", "main")
    git(feature, "switch", "-q", "-c", "feature")
    # A learning rate too small to learn in two epochs: metrics and the confusion plots change.
    edit_params(feature, lambda params: params["variants"]["scratch"].update(lr=1e-4))
    commit_all(feature, "scratch lr 1e-4")
    git(feature, "push", "-q", "origin", "feature")
    record["request"] = run_job("request", "feature", **request_env(provider, tmp))
    # The same job again on its runner (a re-run: nothing to retrain), then as if the request came from a fork.
    again = record["request"]["runner"]
    record["request_again"] = run_job("request-again", "feature", again, **request_env(provider, tmp))
    record["fork"] = run_job("fork", "feature", again, **request_env(provider, tmp, fork=True))
    record["all_calls"] = recorder.calls[start:]
    return record


def output(step: dict) -> str:
    return step["result"].stdout + step["result"].stderr


@pytest.mark.integration
def test_a_push_to_the_default_branch_opens_a_request_with_the_results(story):
    main = story["main"]
    assert main["result"].returncode == 0, output(main)[-4000:]
    branch = story["results_branch"]
    assert branch, main["branches"]
    assert set(main["branches"]) == {"main", branch}
    assert "dvc.lock" in story["review_files"]
    assert any(path.startswith(("results/", "reports/", "metrics/")) for path in story["review_files"])
    opened = [call for call in main["sent"] if call["path"].endswith(("/pulls", "/merge_requests"))]
    assert len(opened) == 1, main["sent"]
    body = opened[0]["body"]
    if story["provider"] == "github":
        assert opened[0]["path"] == "/repos/team/mlp/pulls"
        assert (body["head"], body["base"]) == (branch, "main") and MARKER in body["body"]
        assert opened[0]["headers"]["authorization"] == "Bearer gh-token"
    else:
        assert opened[0]["path"] == "/api/v4/projects/42/merge_requests"
        assert (body["source_branch"], body["target_branch"]) == (branch, "main") and MARKER in body["description"]
        assert opened[0]["headers"]["private-token"] == "gl-token"


@pytest.mark.integration
def test_a_checkout_of_the_results_commit_is_dvc_status_clean(story):
    assert story["review_pull"].returncode == 0, story["review_pull"].stderr[-3000:]
    assert "Data and pipelines are up to date" in story["review_status"].stdout, story["review_status"].stdout


@pytest.mark.integration
def test_the_default_branch_run_moves_the_champion(story):
    assert story["main"]["registry"]["champion"] is not None


@pytest.mark.integration
def test_a_second_run_on_the_same_inputs_commits_and_opens_nothing(story):
    merged = story["merged"]
    assert merged["result"].returncode == 0, output(merged)[-4000:]
    assert "Running stage" not in output(merged)
    assert merged["branches"] == {**story["main"]["branches"], "main": merged["branches"]["main"]}
    assert merged["branches"]["main"] == story["main"]["branches"][story["results_branch"]]  # main did not move
    assert not [call for call in merged["sent"] if call["path"].endswith(("/pulls", "/merge_requests"))]
    assert "unchanged: nothing to commit" in merged["result"].stdout


@pytest.mark.integration
def test_a_request_never_moves_the_champion_and_registers_a_challenger(story):
    before, request = story["merged"]["registry"], story["request"]
    assert request["result"].returncode == 0, output(request)[-4000:]
    assert request["registry"]["champion"] == before["champion"] == story["main"]["registry"]["champion"]
    assert request["registry"]["challenger"] is not None
    assert set(request["branches"]) == {*story["merged"]["branches"], "feature"}  # the request's job pushed none


@pytest.mark.integration
def test_a_request_gets_the_report_with_its_plots_as_one_comment_updated_in_place(story):
    first, again = story["request"]["sent"], story["request_again"]["sent"]
    assert story["request_again"]["result"].returncode == 0, output(story["request_again"])[-4000:]
    where = (
        "/repos/team/mlp/issues/7/comments"
        if story["provider"] == "github"
        else "/api/v4/projects/42/merge_requests/7/notes"
    )
    created = [call for call in first if call["path"] == where]
    assert len(created) == 1 and created[0]["method"] == "POST"
    body = created[0]["body"]["body"]
    assert body.startswith(MARKER) and "## Params changed" in body and "variants.scratch.lr" in body
    assert "| scratch |" in body and "| verdict |" in body
    plots = body.split("## Plots")[1].split("## MLflow runs")[0]
    assert "No plot changed." not in plots and ".ci-retrain/plots" not in body  # drawn, and no local path leaks
    if story["provider"] == "gitlab":  # uploaded and embedded
        uploads = [call for call in first if call["path"] == "/api/v4/projects/42/uploads"]
        assert uploads and plots.count("](/uploads/0123abcd/") == len(uploads)
    else:  # GitHub has no upload API for comments: a link to the run, whose artifact holds the PNG files
        assert "](https://github.example/team/mlp/actions/runs/99)" in plots and ".png" in plots
    updated = [call for call in again if "/comments" in call["path"] or "/notes" in call["path"]]
    assert [call["method"] for call in updated] == (["PATCH"] if story["provider"] == "github" else ["PUT"])
    assert updated[0]["path"].endswith("/1")


@pytest.mark.integration
def test_a_fork_request_skips_the_comment_with_a_notice_and_keeps_the_job_green(story):
    fork = story["fork"]
    assert fork["result"].returncode == 0, output(fork)[-4000:]
    assert not [call for call in fork["sent"] if "/comments" in call["path"] or "/notes" in call["path"]]
    assert "notice: a request from a fork cannot be commented on" in fork["result"].stdout
    if story["provider"] == "github":
        assert MARKER in fork["summary"] and "## Metrics changed" in fork["summary"]


@pytest.mark.integration
def test_the_job_leaves_no_file_of_its_own_for_git(story):
    for step in ("main", "merged", "request"):
        status = git(story[step]["runner"], "status", "--porcelain")
        assert ".ci-retrain" not in status, status


# The report's plots -----------------------------------------------------------------------------------------------


def vega_entry(now: list[float], base: list[float], mark: str = "line") -> dict:
    """A `dvc plots diff --json --split` entry as DVC prints it: the spec, and the rows of both revisions."""
    rows = [
        {"epoch": str(epoch), "loss": str(value), "rev": rev, "filename": "a/history.csv"}
        for rev, values in (("workspace", now), ("HEAD~1", base))
        for epoch, value in enumerate(values, 1)
    ]
    content = {"layer": [{"mark": mark, "encoding": {"x": {"field": "epoch"}, "y": {"field": "loss"}}}]}
    return {
        "type": "vega",
        "revisions": ["workspace", "HEAD~1"],
        "content": content,
        "anchor_definitions": {"<DVC_METRIC_DATA>": rows},
    }


def test_a_plot_is_drawn_only_when_its_data_changed(tmp_path):
    from pipeline import ci_report

    assert not ci_report.draw_vega("loss", vega_entry([1.0, 0.5], [1.0, 0.5]), tmp_path / "same.png")
    assert not (tmp_path / "same.png").exists()
    for mark in ("line", "rect"):  # curves, and a confusion matrix (DVC's confusion templates draw rects)
        assert ci_report.draw_vega("loss", vega_entry([1.0, 0.4], [1.0, 0.5], mark), tmp_path / f"{mark}.png")
        assert (tmp_path / f"{mark}.png").read_bytes().startswith(b"\x89PNG")


# Set-up from the lock ---------------------------------------------------------------------------------------------


def ci_retrain_module():
    """bin/ci-retrain as a module (it has no .py suffix), for its pure functions."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("ci_retrain", str(REPO / "bin/ci-retrain"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("ci_retrain", loader))
    loader.exec_module(module)
    return module


MARKERS = "; sys_platform == 'linux' \\"
LOCK_SAMPLE = f"""# Generated: do not edit
numpy==2.3.0 {MARKERS}
    --hash=sha256:aaaa \\
    --hash=sha256:bbbb
    # via torch
torch==2.14.1 {MARKERS}
    --hash=sha256:cccc
nvidia-cublas==13.1.1.3 {MARKERS}
    --hash=sha256:dddd
cuda-bindings==13.0.1 ; python_full_version < '3.14' \\
    --hash=sha256:eeee
cuda-bindings==13.0.1 ; python_full_version >= '3.14' \\
    --hash=sha256:ffff
triton==3.5.0 {MARKERS}
    --hash=sha256:0000
torchvision==0.29.1 {MARKERS}
    --hash=sha256:1111
"""


def test_off_a_gpu_the_lock_loses_cuda_torch_and_its_libraries_and_keeps_its_hashes():
    module = ci_retrain_module()
    kept, pins = module.cpu_lock(module.lock_entries(LOCK_SAMPLE))
    assert pins == ["torch==2.14.1", "torchvision==0.29.1"]
    assert "numpy==2.3.0" in kept and "--hash=sha256:aaaa" in kept and "--hash=sha256:bbbb" in kept
    for gone in ("torch==", "torchvision", "nvidia", "cuda-bindings", "triton", "cccc", "1111"):
        assert gone not in kept, gone


# Bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"CI_RETRAIN_RESULTS": "sometimes"}, "error: CI_RETRAIN_RESULTS='sometimes': expected one of request"),
        ({"CI_RETRAIN_SKIP_SETUP": "0"}, "error: requirements/run.lock is missing"),
    ],
)
def test_bad_settings_are_one_line_naming_the_value(tmp_path, variables, message):
    project = copy_repo(tmp_path / "project")
    (project / "requirements/run.lock").unlink(missing_ok=True)
    env = {**provider_env("gitlab", "http://127.0.0.1:9", "0" * 40, tmp_path / "summary"), **variables}
    result = ci_retrain(project, env)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_an_argument_is_refused_in_one_line():
    result = subprocess.run([sys.executable, str(REPO / "bin/ci-retrain"), "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: unexpected argument '--dry-run'")
