"""Team mode (#17) on real servers: bin/team-server's PostgreSQL, MLflow server with basic auth and sshd.

One stack per module, started and always stopped by the script itself. A seed project runs the pipeline
against it and publishes to the git and DVC remotes; two clones run experiments at once; a third gets them.
Nothing is mocked. Every wait is bounded (a subprocess timeout or a deadline).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_repo, edit_params, run_tool, tiny_params, tool_env

TEAM_SERVER = REPO / "bin" / "team-server"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SSHD = Path("/usr/sbin/sshd")
EXPERIMENT, MODEL = "d2l-mlp", "d2l-mlp"

pytestmark = [
    pytest.mark.team,
    pytest.mark.integration,
    pytest.mark.skipif(
        not (PG_BIN / "initdb").exists(), reason=f"no PostgreSQL 15 in {PG_BIN} (bin/setup installs it)"
    ),
    pytest.mark.skipif(not SSHD.exists(), reason=f"no {SSHD} (bin/setup installs openssh-server)"),
]


@dataclass
class Stack:
    root: Path
    uri: str
    ports: dict

    def password(self, user: str) -> str:
        return (self.root / "secrets" / f"{user}.password").read_text().strip()

    def env(self, user: str = "member", password: str | None = None, **extra: str) -> dict:
        """What a user's shell has after `eval "$(bin/team-server env)"`."""
        return tool_env(
            MLFLOW_TRACKING_URI=self.uri,
            MLFLOW_TRACKING_USERNAME=user,
            MLFLOW_TRACKING_PASSWORD=password or self.password(user),
            **extra,
        )

    def server(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_tool([str(TEAM_SERVER), *args, "--state-dir", str(self.root)], REPO, timeout=240, check=check)

    def remote_url(self) -> str:
        return f"ssh://{pwd.getpwuid(os.getuid()).pw_name}@127.0.0.1:{self.ports['ssh']}{self.root / 'dvc-store'}"


@pytest.fixture(scope="module")
def stack():
    """The whole stack in a fresh state dir under /tmp (pytest's own tmp dir is 0700 root: postgres cannot
    traverse it); stopped in teardown, which also checks that no process of it is left."""
    root = Path(tempfile.mkdtemp(prefix="team-stack-", dir="/tmp"))
    stack = Stack(root, "", {})
    try:
        stack.server("start")
        stack.ports = json.loads((root / "state.json").read_text())["ports"]
        stack.uri = f"http://127.0.0.1:{stack.ports['mlflow']}"
        yield stack
    finally:
        pids = stack_pids(root)
        stack.server("stop", check=False)
        left = [pid for pid in pids if alive(pid)]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left after stop: {left}"


def stack_pids(root: Path) -> set[int]:
    """Every process whose command line names the state dir, its process group and all its descendants
    (PostgreSQL's workers run in process groups of their own)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True, timeout=10).stdout
    rows = [line.split(None, 3) for line in table.splitlines() if len(line.split(None, 3)) == 4]
    found = {int(pid) for pid, _, _, args in rows if str(root) in args}
    found |= {int(pid) for pid, _, group, _ in rows if int(group) in found}
    while grown := {int(pid) for pid, parent, _, _ in rows if int(parent) in found} - found:
        found |= grown
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def mlflow_as(stack: Stack, user: str, password: str | None = None):
    """An MlflowClient on the team server with a user's credentials (read from the env on every request)."""
    from mlflow import MlflowClient

    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or stack.password(user))
    try:
        yield MlflowClient(tracking_uri=stack.uri, registry_uri=stack.uri)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})


FAULTS = "d2l-faults"  # the fault tests' runs, kept apart from the seed project's experiment


def all_runs(client, experiment: str = EXPERIMENT) -> list:
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def git(repo: Path, *args: str) -> str:
    return run_tool(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], repo).stdout


def use_team_remotes(repo: Path, stack: Stack) -> None:
    """Per clone: the SSH key is local config (never committed); the remote URL is in .dvc/config."""
    run_tool(
        ["dvc", "remote", "modify", "--local", "team", "keyfile", str(stack.root / "secrets" / "ssh_user_key")], repo
    )


# --- the seed project: the pipeline on the team stack, published to both remotes ----------------------------
@pytest.fixture(scope="module")
def project(stack, tiny_dataset, tmp_path_factory):
    """One variant on tiny data, `dvc repro` as the regular user, then `dvc push` and `git push`."""
    repo = copy_repo(tmp_path_factory.mktemp("seed"))
    edit_params(repo, tiny_params(tiny_dataset))
    edit_params(repo, lambda params: params.update(variants={"base": {"init_std": 0.01, "lr": 0.1}}))
    edit_params(repo, lambda params: params["train"].update(seeds=[0]))
    run_tool(["dvc", "remote", "add", "-d", "team", stack.remote_url()], repo)
    # The MNIST lesson is never run offline: its dvc.lock names outputs no cache has, which `dvc exp apply`
    # (it takes no targets) would fail to check out.
    git(repo, "rm", "-rq", "lessons/mnist")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny params, team remote")
    use_team_remotes(repo, stack)
    started = time.time() * 1000
    output = run_tool(["dvc", "repro"], repo, stack.env(), timeout=400).stdout
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "trained")
    run_tool(["dvc", "push"], repo, stack.env(), timeout=120)
    git(repo, "remote", "add", "origin", str(stack.root / "git" / "project.git"))
    git(repo, "push", "-q", "origin", "HEAD:refs/heads/main")
    return {"repo": repo, "output": output, "started_ms": started}


def test_start_is_idempotent_and_status_says_where_without_secrets(stack):
    before = stack.server("status").stdout
    again = stack.server("start").stdout
    pids = re.findall(r"running, pid (\d+)", before)
    assert len(pids) == 3 and re.findall(r"running, pid (\d+)", again) == pids  # nothing restarted
    for port in stack.ports.values():
        assert f"127.0.0.1:{port}" in before
    assert f"export MLFLOW_TRACKING_URI={stack.uri}" in before and "export MLFLOW_TRACKING_USERNAME=member" in before
    assert f'MLFLOW_TRACKING_PASSWORD="$(cat {stack.root}/secrets/member.password)"' in before
    for user in ("admin", "member"):
        assert stack.password(user) not in before + again
    secrets = stack.root / "secrets"
    assert {path.stat().st_mode & 0o777 for path in secrets.iterdir() if not path.name.endswith(".pub")} == {0o600}
    assert secrets.stat().st_mode & 0o777 == 0o700


def test_pipeline_logs_every_stage_with_artifacts_through_the_server(stack, project):
    stages = set(re.findall(r"Running stage '([^']+)'", project["output"]))
    assert stages == {"download", "prepare", "train@base", "evaluate@base", "compare", "init_scale", "linreg", "spiral"}
    with mlflow_as(stack, "member") as client:
        runs = {run.info.run_name: run for run in all_runs(client)}
        # evaluate adds the test figures to the variant's train run; the lessons and the study log to their own
        # experiments; one nested seed run
        assert set(runs) == {"download", "prepare", "train@base", "train@base seed 0", "evaluate@base", "compare"}
        for name, run in runs.items():
            assert run.info.status == "FINISHED", name
            assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri  # proxied
        train = runs["train@base"]
        assert "test_accuracy_mean" in train.data.metrics
        model_files = list((stack.root / "mlflow" / "artifacts").rglob("MLmodel"))
        assert model_files, "the model's files are not in the server's artifact store"
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert champion.run_id == train.info.run_id
    import mlflow.pyfunc
    import numpy as np

    with mlflow_as(stack, "member"):
        mlflow.set_tracking_uri(stack.uri)
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")  # downloaded through the server
        assert len(model.predict(np.full((2, 28, 28), 200, dtype=np.uint8))) == 2


# --- two machines, one truth -----------------------------------------------------------------------------
EXPERIMENTS = {"lr-005": "0.05", "lr-02": "0.2"}  # name -> variants.base.lr, one per machine


def clone(stack: Stack, destination: Path) -> Path:
    """A fresh machine: the git remote's main branch, its own DVC cache, the team key."""
    run_tool(
        ["git", "clone", "-q", "-b", "main", str(stack.root / "git" / "project.git"), str(destination)],
        destination.parent,
    )
    use_team_remotes(destination, stack)
    return destination


def queue_finished(repo: Path, env: dict, timeout_s: float = 420) -> str:
    """Poll `dvc queue status` until nothing is queued or running; its last output."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run_tool(["dvc", "queue", "status"], repo, env, timeout=60).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(3)
    raise AssertionError(f"queue in {repo} not done after {timeout_s} s:\n{status}")


@pytest.fixture(scope="module")
def machines(stack, project, tmp_path_factory):
    """Machines A and B each queue one experiment, run them at the same time, push to both remotes."""
    root = tmp_path_factory.mktemp("machines")
    env = stack.env()
    repos = {}
    for (name, lr), machine in zip(EXPERIMENTS.items(), "AB"):
        repo = repos[name] = clone(stack, root / machine)
        run_tool(
            ["dvc", "pull", "dvc.yaml"], repo, env, timeout=120
        )  # the baseline's outputs: the experiment reuses them
        run_tool(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"variants.base.lr={lr}"], repo, env)
    for repo in repos.values():
        run_tool(["dvc", "queue", "start", "--jobs", "1"], repo, env)
    try:
        statuses = {name: queue_finished(repo, env) for name, repo in repos.items()}
    finally:
        for repo in repos.values():
            run_tool(["dvc", "queue", "stop"], repo, env, check=False, timeout=60)
    for name, repo in repos.items():
        assert re.search(rf"{name}\s.*Success", statuses[name]), statuses[name]
        run_tool(["dvc", "exp", "push", "origin", name], repo, env, timeout=120)  # git refs + cached outputs
        run_tool(["dvc", "push"], repo, env, timeout=120)
    return repos


def test_third_machine_gets_both_experiments_without_retraining(stack, project, machines, tmp_path):
    env = stack.env()
    with mlflow_as(stack, "member") as client:
        runs_before = len(all_runs(client))
    c = clone(stack, tmp_path / "C")
    for name in EXPERIMENTS:
        run_tool(["dvc", "exp", "pull", "origin", name], c, env, timeout=120)
    run_tool(["dvc", "pull", "dvc.yaml"], c, env, timeout=120)  # not lessons/mnist: never run
    shown = run_tool(["dvc", "exp", "show", "--csv"], c, env).stdout
    assert all(name in shown for name in EXPERIMENTS), shown
    run_ids = {}
    for name in EXPERIMENTS:
        run_tool(["dvc", "exp", "apply", name], c, env)
        status = run_tool(["dvc", "status", "dvc.yaml"], c, env).stdout
        assert "up to date" in status, status  # every output is there and matches dvc.lock: nothing to retrain
        assert (c / "models/base/seed-0.pt").is_file()
        digest = hashlib.md5((c / "results/base/train.json").read_bytes()).hexdigest()
        with mlflow_as(stack, "member") as client:  # the output finds its run by the MD5 its runs are tagged with
            (found,) = [run for run in all_runs(client) if run.info.run_name == "train@base"
                        and run.data.tags.get("results_md5") == digest]  # fmt: skip
        run_ids[name] = found.info.run_id
    with mlflow_as(stack, "member") as client:
        runs = all_runs(client)
        assert len(runs) == runs_before  # C ran nothing
        by_id = {run.info.run_id: run for run in runs}
        for name, lr in EXPERIMENTS.items():
            assert by_id[run_ids[name]].data.params["lr"] == lr and by_id[run_ids[name]].info.status == "FINISHED"
        assert all(run.info.status == "FINISHED" for run in runs)
        # the seed's download, prepare, train@base, its seed run, evaluate@base and compare; per experiment the last 4
        assert len(runs) == 6 + 4 * len(EXPERIMENTS)
        assert_lineage(client, runs, project["repo"], run_ids)


def assert_lineage(client, runs: list, seed: Path, experiment_train_runs: dict[str, str]) -> None:
    """Issue 12's lineage, grouped here: every run says which commit and experiment made it, and the alias
    `champion` moves only from a clean non-experiment run (experiments set `challenger`)."""
    experiment_of = {run_id: name for name, run_id in experiment_train_runs.items()}
    seed_commit = git(seed, "rev-parse", "HEAD~1").strip()  # HEAD is "trained", made after the repro
    for run in runs:
        tags = run.data.tags
        assert {"git_commit", "git_dirty", "stage"} <= set(tags), run.info.run_name
        if run.info.run_name.startswith("train@"):
            assert tags["variant"] == "base"
    seed_train = [run for run in runs if run.info.run_name == "train@base" and run.info.run_id not in experiment_of]
    assert len(seed_train) == 1 and not seed_train[0].data.tags.get("dvc_exp_name")
    assert seed_train[0].data.tags["git_commit"] == seed_commit and seed_train[0].data.tags["git_dirty"] == "false"
    for run_id, name in experiment_of.items():
        assert client.get_run(run_id).data.tags["dvc_exp_name"] == name
    assert client.get_model_version_by_alias(MODEL, "champion").run_id == seed_train[0].info.run_id
    assert client.get_model_version_by_alias(MODEL, "challenger").run_id in experiment_of


# --- security --------------------------------------------------------------------------------------------
def test_requests_without_or_with_wrong_credentials_are_refused(stack):
    wrong = "Basic " + __import__("base64").b64encode(b"member:not-the-password").decode()
    for headers in ({}, {"Authorization": wrong}):
        request = urllib.request.Request(
            f"{stack.uri}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401


@pytest.fixture(scope="module")
def colleague(stack) -> tuple[str, str]:
    """A second regular user, created by the admin through the auth REST API."""
    import secrets

    from mlflow.server import get_app_client

    password = secrets.token_urlsafe(16)
    with mlflow_as(stack, "admin"):
        get_app_client("basic-auth", tracking_uri=stack.uri).create_user("colleague", password)
    return "colleague", password


def test_member_cannot_delete_another_users_experiment(stack, colleague):
    from mlflow.exceptions import MlflowException

    with mlflow_as(stack, *colleague) as client:
        experiment_id = client.create_experiment("colleagues-experiment")
    with mlflow_as(stack, "member") as client:
        assert client.get_experiment(experiment_id).name == "colleagues-experiment"  # default permission: READ
        with pytest.raises(MlflowException) as denied:
            client.delete_experiment(experiment_id)
        assert denied.value.get_http_status_code() == 403
        assert client.get_experiment(experiment_id).lifecycle_stage == "active"


def test_member_sets_an_alias_only_where_granted(stack, colleague):
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    with mlflow_as(stack, *colleague) as client:
        experiment_id = client.create_experiment("colleagues-models")
        run = client.create_run(experiment_id)
        client.log_text(run.info.run_id, "weights", "model/weights.txt")
        client.set_terminated(run.info.run_id)
        client.create_registered_model("colleagues-model")
        version = client.create_model_version(
            "colleagues-model", f"{run.info.artifact_uri}/model", run.info.run_id
        ).version
    with mlflow_as(stack, "member") as client:
        with pytest.raises(MlflowException) as denied:
            client.set_registered_model_alias("colleagues-model", "champion", version)
        assert denied.value.get_http_status_code() == 403
    with mlflow_as(stack, "admin"):
        get_app_client("basic-auth", tracking_uri=stack.uri).grant_user_permission(
            "member", "registered_model", "colleagues-model", "EDIT"
        )
    with mlflow_as(stack, "member") as client:
        client.set_registered_model_alias("colleagues-model", "champion", version)
        assert client.get_model_version_by_alias("colleagues-model", "champion").version == version


def test_wrong_password_fails_a_stage_with_one_line_naming_the_server(stack, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lessons.linreg.linreg",
            "--metrics",
            str(tmp_path / "linreg.json"),
            "--plot",
            str(tmp_path / "linreg.png"),
        ],
        cwd=REPO,
        env=stack.env(password="not-the-password"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    print(errors)  # shown with -rP: what a user sees
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow tracking at {stack.uri} failed"), result.stderr
    assert "401" in errors[0] or "not authenticated" in errors[0].lower(), errors[0]
    assert "Traceback" not in result.stderr
    assert "not-the-password" not in result.stderr + result.stdout
    assert not (tmp_path / "linreg.json").exists()


def test_no_password_in_runs_logs_or_committed_files(stack, project):
    secrets_dir = stack.root / "secrets"
    passwords = [path.read_text().strip().encode() for path in secrets_dir.iterdir() if path.suffix == ".password"]
    passwords.append((secrets_dir / "flask_secret_key").read_text().strip().encode())
    with mlflow_as(stack, "admin") as client:
        experiments = client.search_experiments()
        runs = [run for experiment in experiments for run in client.search_runs([experiment.experiment_id])]
    recorded = json.dumps([[run.data.tags, run.data.params] for run in runs]).encode()
    assert runs and not [secret for secret in passwords if secret in recorded]
    # Every file the stack and the project wrote: logs, configs, the auth and tracking databases, artifacts,
    # the repo and its git history. Only the secrets directory may hold them.
    files = [path for path in stack.root.rglob("*") if path.is_file() and secrets_dir not in path.parents]
    files += [path for path in project["repo"].rglob("*") if path.is_file()]
    leaks = [str(path) for path in files for secret in passwords if secret in path.read_bytes()]
    assert not leaks


# --- faults ----------------------------------------------------------------------------------------------
def small_project(stack: Stack, tiny: dict, destination: Path) -> Path:
    """A repo copy on tiny data with the team's DVC remote, nothing run yet."""
    repo = copy_repo(destination)
    edit_params(repo, tiny_params(tiny))
    edit_params(repo, lambda params: params["mlflow"].update(experiment=FAULTS))  # apart from the seed project's
    run_tool(["dvc", "remote", "add", "-d", "team", stack.remote_url()], repo)
    use_team_remotes(repo, stack)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny params, team remote")
    return repo


def wait_for_run(stack: Stack, name: str, since_ms: float, timeout_s: float = 120, experiment: str = FAULTS):
    """The first run called `name` that started after since_ms, once the server lists it as RUNNING."""
    deadline = time.monotonic() + timeout_s
    with mlflow_as(stack, "member") as client:
        while time.monotonic() < deadline:
            runs = [
                run
                for run in all_runs(client, experiment)
                if run.info.run_name == name and run.info.start_time >= since_ms
            ]
            if runs and runs[0].info.status == "RUNNING":
                return runs[0]
            time.sleep(0.5)
    raise AssertionError(f"no RUNNING {name} run on the server after {timeout_s} s")


def test_postgres_stopped_while_a_stage_runs(stack, project, tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(project["repo"] / "params.yaml", params)
    edit_params(tmp_path, lambda values: values["train"].update(epochs=2000))  # trains a while, then logs
    edit_params(tmp_path, lambda values: values["mlflow"].update(experiment=FAULTS))
    out = {name: tmp_path / name for name in ("models", "train.json", "history.csv", "stdout", "stderr")}
    started = time.time() * 1000
    with open(out["stdout"], "w") as stdout, open(out["stderr"], "w") as stderr:
        stage = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.stages.train",
                "--params",
                str(params),
                "--variant",
                "base",
                "--data",
                "data/prepared/tiny",
                "--stats",
                "metrics/prepare.json",
                "--models",
                str(out["models"]),
                "--summary",
                str(out["train.json"]),
                "--history",
                str(out["history.csv"]),
            ],
            cwd=project["repo"],
            env=stack.env(),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        # The stage logs once its figures exist: the database goes away while it trains, and logging then fails.
        deadline = time.monotonic() + 120
        while "epoch" not in out["stdout"].read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        stack.server("stop", "postgres")
        returncode = stage.wait(timeout=120)
    finally:
        stage.kill()
        stack.server("start", "postgres")
    errors = out["stderr"].read_text().strip().splitlines()
    print(errors[-1:])  # shown with -rP: what a user sees
    assert returncode != 0 and not out["train.json"].exists()
    assert errors and errors[-1].startswith(f"error: MLflow tracking at {stack.uri} failed"), errors[-30:]
    assert "Traceback" not in out["stderr"].read_text()
    # The next stage, once the database is back, is the first chance the pipeline has to tidy up.
    run_tool(
        [
            sys.executable,
            "-m",
            "lessons.linreg.linreg",
            "--metrics",
            str(tmp_path / "linreg.json"),
            "--plot",
            str(tmp_path / "linreg.png"),
        ],
        project["repo"],
        stack.env(),
        timeout=120,
    )
    with mlflow_as(stack, "member") as client:
        left = [run for run in all_runs(client, FAULTS) if run.info.start_time >= started]
    assert all(run.info.status != "RUNNING" for run in left)  # none left open: closed by the next stage if any


def test_mlflow_server_restarted_between_stages_the_pipeline_goes_on(stack, tiny_dataset, tmp_path):
    repo = small_project(stack, tiny_dataset, tmp_path / "repo")
    run_tool(["dvc", "repro", "download"], repo, stack.env(), timeout=300)
    stack.server("stop", "mlflow")
    stack.server("start", "mlflow")
    output = run_tool(["dvc", "repro", "prepare"], repo, stack.env(), timeout=300).stdout
    assert re.findall(r"Running stage '([^']+)'", output) == ["prepare"]
    with mlflow_as(stack, "member") as client:
        downloads = [run for run in all_runs(client, FAULTS) if run.info.run_name == "download"]
        download = max(downloads, key=lambda run: run.info.start_time)
        prepare = [
            run
            for run in all_runs(client, FAULTS)
            if run.info.run_name == "prepare" and run.info.start_time >= download.info.start_time
        ]
        assert download.info.status == "FINISHED" and [run.info.status for run in prepare] == ["FINISHED"]


def test_dvc_push_to_an_unreachable_remote_fails_clearly_and_keeps_local_results(stack, tiny_dataset, tmp_path):
    repo = small_project(stack, tiny_dataset, tmp_path / "repo")
    run_tool(["dvc", "repro", "download"], repo, stack.env(), timeout=300)
    stack.server("stop", "ssh")
    try:
        result = run_tool(["dvc", "push", "dvc.yaml"], repo, stack.env(), check=False, timeout=120)
    finally:
        stack.server("start", "ssh")
    print(result.stderr)  # shown with -rP: what a user sees
    assert result.returncode != 0
    assert re.search(r"(?i)error.*(connect|refused|unreachable)", result.stderr), result.stderr[-2000:]
    assert (repo / "data/raw/tiny/train-images-idx3-ubyte").is_file()
    assert "up to date" in run_tool(["dvc", "status", "download"], repo, stack.env()).stdout
    run_tool(["dvc", "push", "dvc.yaml"], repo, stack.env(), timeout=120)  # and once it is back, the push works
