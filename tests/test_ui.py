"""The MLflow UI as a user meets it, in a real browser (issue 24).

A small real `dvc repro` in a clean copy of the repo fills its embedded store; `python -m pipeline.ui` serves it
and prints the link README gives; headless Chromium (Debian's, driven by Playwright) then opens the runs, the
Compare view and the registry page. Screenshots land in each test's tmp_path. The model card and the link are
also checked without a browser, in the fast tier.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import model_card, tracking, ui
from tests.conftest import commit_all, copy_repo, edit_params, free_port, run_tool, tiny_params, tool_env

MODEL = "d2l-mlp"  # params.yaml's registered model and experiment, in the temp repo's own store
EXPERIMENT = "d2l-mlp"
VARIANTS = {"base": {"init_std": 0.01}, "scratch": {"impl": "scratch", "init_std": 0.1}}  # differ in impl, init_std
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
UI_START_S = 240  # a bound, not a timing: the UI's first start on a busy 2-core machine


def find_chromium() -> str | None:
    """CHROMIUM if set, else Debian's chromium (its binary, not the shell wrapper), else one on PATH."""
    for candidate in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        found = candidate and shutil.which(candidate)  # which() also checks an absolute path is executable
        if found:
            return found
    return None


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason=f"no Chromium found (CHROMIUM, {', '.join(CHROMIUM_CANDIDATES)}); bin/setup installs Debian's "
    "chromium when root with apt",
)


# --- fast tier: the card and the link, no browser -------------------------------------------------------------


def test_card_holds_every_fact_and_writes_dashes_for_missing_ones():
    card = model_card.markdown(
        "base",
        {"init_std": "0.01", "impl": "module"},
        [0, 1, 2],
        (0.8812, [0.8701, 0.8923]),
        (None, None),
        "addc242c.dir",
        "0f7ae22",
        "best mean validation accuracy",
        "`uint8` tensor of shape `(-1, 28, 28)`",
        changed={"init_std": 0.01},
    )
    for fact in ("variant base", "`impl=module`", "0, 1, 2", "0.8812", "0.8701 to 0.8923", "addc242c.dir", "0f7ae22"):
        assert fact in card, fact
    assert "| test | - | - |" in card
    assert "**Why this model:** best mean validation accuracy" in card and "(-1, 28, 28)" in card


def test_card_from_an_empty_row_is_all_dashes_not_an_error():
    card = model_card.from_compare_row("lost", {}, None, None)
    assert "variant lost" in card and "**Seeds:** -" in card and "**Git commit:** `-`" in card


def test_link_opens_the_runs_in_training_mode():
    assert ui.runs_link("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert ui.runs_link("http://h:1", None).endswith("/#/experiments?workflowType=machine_learning")


# --- integration tier: the real UI in Chromium ------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    repo: Path
    base_url: str
    link: str  # the line pipeline.ui printed
    commit: str  # the temp repo's commit when compare registered the model


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dataset):
    """A clean temp repo after `dvc repro compare` on tiny data, its store served by `python -m pipeline.ui`."""
    repo = copy_repo(tmp_path_factory.mktemp("ui_repo"))
    edit_params(repo, tiny_params(tiny_dataset))
    edit_params(repo, lambda params: params.update(variants=VARIANTS))
    commit_all(repo, "tiny params")  # committed code and params: compare may move @champion
    run_tool(["dvc", "repro", "compare"], repo)  # not the lessons: the UI test needs the variants only
    commit = run_tool(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    port, log_path = free_port(), repo / "ui.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ui", "--port", str(port)],
            cwd=repo,
            env=tool_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        link = wait_for_link(process, log_path)
        yield Served(repo, f"http://127.0.0.1:{port}", link, commit)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the launcher and the mlflow ui it started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def wait_for_link(process: subprocess.Popen, log_path: Path) -> str:
    """The link line pipeline.ui prints once the UI answers; fail with its log if it exits or never says it."""
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline:
        found = re.search(r"MLflow UI, experiment \S+: (\S+)", log_path.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise AssertionError(f"pipeline.ui exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"pipeline.ui printed no link within {UI_START_S} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # a bound for a page on a busy machine, not a timing
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, which CI and the dev machines are.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh browser profile (so the UI's remembered mode starts at its GenAI default), screenshots on failure."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(60_000)  # a bound for a page on a busy machine, not a timing
    tab = context.new_page()
    yield tab
    tab.screenshot(path=tmp_path / "last.png", full_page=True)
    context.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=tmp_path / f"{name}.png", full_page=True)


def select_runs(page, names: list[str]) -> None:
    """Tick the runs named in the runs table, then open the Compare view."""
    for name in names:
        row = page.get_by_role("row").filter(has=page.get_by_text(name, exact=True))
        row.get_by_role("checkbox", name=re.compile("toggle row selection")).check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_url(re.compile(r"compare-runs"))


@pytest.mark.integration
@needs_chromium
def test_runs_page_opens_in_training_mode_with_the_variant_runs_and_their_dataset(served, page, tmp_path):
    from playwright.sync_api import expect

    assert "?workflowType=machine_learning" in served.link and "/#/experiments/" in served.link
    page.goto(served.link)
    for name in VARIANTS:
        expect(page.get_by_text(f"train@{name}", exact=True)).to_be_visible()
    digest = tracking.dvc_hash(Path("data/prepared/tiny"), served.repo / "dvc.lock")[:36]
    expect(page.get_by_role("columnheader", name="Dataset").first).to_be_visible()
    expect(page.get_by_text(f"tiny-train ({digest})", exact=True).first).to_be_visible()
    # The training view's side bar (Runs, Models), not the GenAI one (Overview, Sessions, ...).
    expect(page.get_by_role("link", name="Models", exact=True)).to_be_visible()
    expect(page.get_by_text("Sessions", exact=True)).to_have_count(0)
    shoot(page, tmp_path, "runs")


@pytest.mark.integration
@needs_chromium
def test_compare_view_of_the_variant_runs_shows_the_params_that_differ(served, page, tmp_path):
    from playwright.sync_api import expect

    page.goto(served.link)
    select_runs(page, [f"train@{name}" for name in VARIANTS])
    expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
    page.get_by_role("switch", name="Parameters - Show diff only").click()
    for param, values in {"impl": ("module", "scratch"), "init_std": ("0.01", "0.1")}.items():
        row = page.get_by_role("row").filter(has=page.get_by_text(param, exact=True))
        expect(row).to_have_count(1)
        expect(row.get_by_role("cell")).to_have_text(list(values))  # the param's name is the row's header
    # With "diff only" on, a param both runs share is gone: the view shows what differs.
    expect(page.get_by_role("row").filter(has=page.get_by_text("batch_size", exact=True))).to_have_count(0)
    shoot(page, tmp_path, "compare")


@pytest.mark.integration
@needs_chromium
def test_registry_page_shows_the_champion_alias_and_the_model_card(served, page, tmp_path):
    from playwright.sync_api import expect

    page.goto(f"{served.base_url}/#/models/{MODEL}?workflowType=machine_learning")
    expect(page.get_by_text("@ champion")).to_be_visible()
    shoot(page, tmp_path, "model")
    page.get_by_role("link", name="Version 1", exact=True).click()
    expect(page.get_by_text("@ champion")).to_be_visible()
    card = page.get_by_text("Model card: variant").locator("xpath=..")
    expect(card).to_contain_text("Why this model:")
    expect(card).to_contain_text(served.commit)
    digest = tracking.dvc_hash(Path("data/prepared/tiny"), served.repo / "dvc.lock")[:36]
    expect(card).to_contain_text(digest)
    expect(card).to_contain_text("tensor of shape (-1, 28, 28)")
    shoot(page, tmp_path, "version")


@pytest.mark.integration
@needs_chromium
def test_init_scale_runs_compare_with_init_std_as_a_column(served, page, tmp_path):
    from playwright.sync_api import expect

    run_tool(["dvc", "repro", "init_scale"], served.repo)
    study = ui.experiment_id(served.base_url, "d2l-init-scale")
    assert study is not None, "no experiment d2l-init-scale after dvc repro init_scale"
    page.goto(ui.runs_link(served.base_url, study))
    # The point-and-seed runs are nested under the stage's run: open the group, then select them all.
    parent = page.get_by_role("row").filter(has=page.get_by_text("init_scale", exact=True))
    parent.locator("button[data-component-id*=runnamecellrenderer]").first.click()
    expect(page.get_by_text(re.compile(r"^init_scale std 0\.01 seed 0$"))).to_be_visible()
    page.get_by_role("checkbox", name="Select all runs").check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_url(re.compile(r"compare-runs"))
    expect(page.get_by_role("row").filter(has=page.get_by_text("init_std", exact=True))).to_have_count(1)
    shoot(page, tmp_path, "init_scale_compare")
