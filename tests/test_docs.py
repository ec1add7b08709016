"""README.md and docs/*.md stay true: every figure matches the committed file it names (tools/docfigures.py),
every figure-looking number has a source or a reason, and every command block says which test runs it or
why none does here."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools import docfigures

COMMAND_LANGUAGES = ("sh", "bash", "shell", "console", "python")
FENCE = re.compile(r"^ {0,3}```(\S*)")
MARKER = re.compile(r"^\s*<!-- (runs in|same commands in|not run here): (\S.*?) -->$")


def code_blocks(page: Path) -> list[tuple[int, str, str, list[str]]]:
    """(line of the fence, its language, the marker line before it, the block's lines) for every fenced block."""
    blocks, lines, start = [], page.read_text().splitlines(), None
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence and start is None:
            start, language = number, fence[1]
            before = [text for text in lines[: number - 1] if text.strip()][-1:] or [""]
        elif fence:
            blocks.append((start, language, before[0], [text.strip() for text in lines[start : number - 1]]))
            start = None
    return blocks


def test_every_figure_matches_its_file():
    problems = docfigures.check()
    assert not problems, "run python -m tools.docfigures --write, or commit the file:\n" + "\n".join(map(str, problems))


def test_every_figure_looking_number_has_a_source_or_a_reason():
    assert not docfigures.unsourced(), "\n".join(map(str, docfigures.unsourced()))


def test_a_section_quoting_a_file_that_records_its_machine_names_the_machine():
    assert not docfigures.unnamed_machines(), "\n".join(map(str, docfigures.unnamed_machines()))


def test_every_command_block_says_which_test_runs_it_or_why_none_does():
    unmarked = [
        f"{page.relative_to(REPO)}:{line}"
        for page in docfigures.pages()
        for line, language, before, _ in code_blocks(page)
        if language in COMMAND_LANGUAGES and not MARKER.match(before)
    ]
    assert not unmarked, "a command block without <!-- runs in: / same commands in: / not run here: -->: " + str(
        unmarked
    )


def test_each_marker_names_a_test_that_exists_and_runs_in_reads_its_page():
    for page in docfigures.pages():
        name = str(page.relative_to(REPO))
        for line, _, before, _ in code_blocks(page):
            marker = MARKER.match(before)
            if not marker or marker[1] == "not run here":
                continue
            test_file, _, test_name = marker[2].split()[0].partition("::")
            source = (REPO / test_file).read_text()
            defined = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
            assert not test_name or test_name in defined, f"{name}:{line}: {test_file} has no {test_name}"
            if marker[1] == "runs in":
                assert name in source, f"{name}:{line}: {test_file} never reads {name}"


def test_check_reports_a_figure_that_differs_from_its_file(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "result.json").write_text(json.dumps({"runs": {"a": {"acc": 0.91234}, "b": {"acc": 0.5}}}))
    page = tmp_path / "README.md"
    page.write_text(
        "Accuracy 0.9123<!--fig result.json runs.a.acc .4f--> and `x`<!--fig result.json runs.b.acc s-->.\n"
    )
    assert [str(problem) for problem in docfigures.check(tmp_path)] == [
        "README.md:1: stale: page has `x`, result.json says `0.5`"
    ]
    docfigures.write(tmp_path)
    assert page.read_text().startswith("Accuracy 0.9123<!--fig") and "`0.5`<!--fig" in page.read_text()
    assert docfigures.check(tmp_path) == []


def test_check_reports_a_missing_file_or_key_and_write_leaves_them(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "r.json").write_text("{}")
    text = "1.5<!--fig nowhere.json a .1f--> and 2.5<!--fig r.json a.b .1f-->\n"
    (tmp_path / "README.md").write_text(text)
    messages = [problem.message for problem in docfigures.write(tmp_path)]
    assert messages == ["nowhere.json: no such file", "no key 'a'"]
    assert (tmp_path / "README.md").read_text() == text


def test_filters_globs_and_includes(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    for name, seconds in (("a", [1.0, 2.0]), ("b", [3.5])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "t.json").write_text(json.dumps({"per_seed": [{"s": value} for value in seconds]}))
    (tmp_path / "report.md").write_text("# r\n\n| x |\n|---|\n| 1 |\n\ntext\n")
    (tmp_path / "ratio.json").write_text(json.dumps({"fast": 9.0, "slow": 3.0}))
    (tmp_path / "README.md").write_text(
        "0<!--fig ratio.json fast|/slow .1f-->x, **x**<!--fig ratio.json fast|/slow|atleast:3.5 s-->,"
        " **x**<!--fig ratio.json slow|atmost:3 s-->\n"
        "0<!--fig */t.json per_seed.*.s|sum .1f--> s, 0<!--fig a/t.json per_seed.*.s|mean|*100 .0f-->\n"
        "<!--include report.md table 1-->\n<!--/include-->\n"
    )
    docfigures.write(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("3.0<!--fig") and "**not met**<!--fig" in text and "**met**<!--fig ratio.json slow" in text
    assert "6.5<!--fig" in text and " s, 150<!--fig" in text and "| x |\n|---|\n| 1 |\n<!--/include-->" in text


def test_unsourced_flags_loose_figures_and_spares_code_versions_and_reasons(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "Took 12.5 s and 40 s; 3 seeds, issue 18, MLflow 3.17, torch 2.14.1, 95% interval, `lr 0.1`.\n"
        "About 0.85<!--nofig d2l's figure--> and 2 s<!--nofig a constant-->.\n\n```sh\nsleep 0.5\n```\n"
        "<!--nofig-block a table of examples-->\n| 1.5 | 2.5 |\n\nthen 7%.\n"
    )
    assert [problem.message.split()[0] for problem in docfigures.unsourced(tmp_path)] == ["'12.5'", "'40", "'7%'"]


def test_a_selector_picks_the_one_list_item_and_a_key_may_hold_spaces(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    points = [{"w1": 0.01, "w2": 0.01, "loss": 0.3}, {"w1": 0.01, "w2": 1.0, "loss": 0.9}, {"w1": None, "loss": 0.2}]
    (tmp_path / "r.json").write_text(json.dumps({"points": points, "costs": {"import torch, once": 0.95}}))
    (tmp_path / "README.md").write_text(
        "0<!--fig r.json points.[w1=0.01,w2=1].loss .1f--> 0<!--fig r.json points.[w1=None].loss .1f-->"
        " 0<!--fig r.json points.[w1=0.01].loss .1f--> 0<!--fig r.json costs.import torch, once .2f-->\n"
    )
    assert [problem.message for problem in docfigures.write(tmp_path)] == ["[w1=0.01]: matches 2 items, expected one"]
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("0.9<!--fig r.json points.[w1=0.01,w2=1].loss .1f--> 0.2") and " 0.95<!--fig" in text


@pytest.mark.integration
def test_testing_page_tier_commands_collect_tests():
    page = REPO / "docs/testing.md"
    markers = re.findall(r'(?m)^\s+"(\w+): ', (REPO / "pyproject.toml").read_text())  # tomllib is 3.11+
    assert markers and {f"`-m {marker}`" for marker in markers} <= set(re.findall(r"`-m \w+`", page.read_text()))
    [block] = [lines for _, _, before, lines in code_blocks(page) if "test_testing_page_tier_commands" in before]
    for command in block:
        argv = [str(REPO / word) if word.startswith(".venv/") else word for word in shlex.split(command)]
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", result.stdout)
        assert result.returncode == 0 and collected and int(collected[1]) > 0, (command, result.stdout[-500:])
