"""README.md and docs/*.md read as plain text and stay checkable: every figure-looking number has a source or a
reason, comments and long lines stay within their limits, and every command block says which test runs it or why
none does here. Whether the figures equal the committed results is CI's check after the pipeline
(`python -m tools.docfigures --check`); here the checker itself is tested on pages and files it writes."""

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


@pytest.mark.parametrize("page", docfigures.pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_each_page_reads_as_plain_text(page: Path):
    problems = docfigures.page_form(REPO, page, page.read_text())
    assert not problems, "\n".join(f"{page.relative_to(REPO)}:{line}: {message}" for line, message in problems)


def test_every_figure_looking_number_has_a_source_or_a_reason():
    assert not docfigures.unsourced(), "\n".join(map(str, docfigures.unsourced()))


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


def project(tmp_path: Path, files: dict[str, str]) -> Path:
    """A tiny project: README.md, docs/ and result files, written as given."""
    (tmp_path / "docs").mkdir()
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_check_catches_a_stale_reference_and_write_makes_it_fresh(tmp_path: Path):
    root = project(
        tmp_path,
        {
            "result.json": json.dumps({"runs": {"a": {"acc": 0.91234}, "b": {"acc": 0.5}}}),
            "README.md": "Accuracy [0.9123][a acc] and [`x`][b acc].\n\n"
            '[a acc]: result.json "runs.a.acc .4f"\n[B  Acc]: result.json "runs.b.acc s"\n',
            "docs/page.md": 'From a page below: [0.90][a].\n\n[a]: ../result.json "runs.a.acc .2f"\n',
        },
    )
    assert [str(problem) for problem in docfigures.check(root)] == [
        "README.md:1: stale: page has `x`, its file says `0.5`",
        "docs/page.md:1: stale: page has 0.90, its file says 0.91",
    ]
    assert docfigures.write(root) == []
    assert (root / "README.md").read_text().startswith("Accuracy [0.9123][a acc] and [`0.5`][b acc].\n")
    assert (root / "docs/page.md").read_text().startswith("From a page below: [0.91][a].")
    assert docfigures.check(root) == [] and docfigures.form(root) == []


def test_check_catches_a_stale_inline_figure_and_include(tmp_path: Path):
    root = project(
        tmp_path,
        {
            "r.json": json.dumps({"acc": 0.75}),
            "report.md": "# r\n\n| x |\n|---|\n| 2 |\n",
            "README.md": "0.70<!--fig r.json acc .2f-->\n<!--include report.md table 1-->\n"
            "| x |\n|---|\n| 1 |\n<!--/include-->\n",
        },
    )
    assert [str(problem) for problem in docfigures.check(root)] == [
        "README.md:1: stale: page has 0.70, its file says 0.75",
        "README.md:5: stale: an included line differs from its file",
    ]
    docfigures.write(root)
    assert docfigures.check(root) == []


def test_check_reports_a_missing_file_or_key_and_write_leaves_them(tmp_path: Path):
    text = '[1.5][gone] and [2.5][no key]\n\n[gone]: nowhere.json "a .1f"\n[no key]: r.json "a.b .1f"\n'
    root = project(tmp_path, {"r.json": "{}", "README.md": text})
    assert [str(problem) for problem in docfigures.write(root)] == [
        "README.md:1: nowhere.json: no such file",
        "README.md:1: no key 'a'",
    ]
    assert (root / "README.md").read_text() == text


def test_filters_globs_and_includes(tmp_path: Path):
    root = project(
        tmp_path,
        {
            "a/t.json": json.dumps({"per_seed": [{"s": 1.0}, {"s": 2.0}]}),
            "b/t.json": json.dumps({"per_seed": [{"s": 3.5}]}),
            "report.md": "# r\n\n| x |\n|---|\n| 1 |\n\ntext\n",
            "ratio.json": json.dumps({"fast": 9.0, "slow": 3.0}),
            "README.md": "[0][ratio] [**x**][goal], [**x**][low]; [0][sum] s, [0][pct]\n"
            "<!--include report.md table 1-->\n<!--/include-->\n\n"
            '[ratio]: ratio.json "fast|/slow .1f"\n[goal]: ratio.json "fast|/slow|atleast:3.5 s"\n'
            '[low]: ratio.json "slow|atmost:3 s"\n[sum]: */t.json "per_seed.*.s|sum .1f"\n'
            '[pct]: a/t.json "per_seed.*.s|mean|*100 .0f"\n',
        },
    )
    assert docfigures.write(root) == []
    text = (root / "README.md").read_text()
    assert text.startswith("[3.0][ratio] [**not met**][goal], [**met**][low]; [6.5][sum] s, [150][pct]\n")
    assert "| x |\n|---|\n| 1 |\n<!--/include-->" in text


def test_a_selector_picks_the_one_list_item_and_a_key_may_hold_spaces(tmp_path: Path):
    points = [{"w1": 0.01, "w2": 0.01, "loss": 0.3}, {"w1": 0.01, "w2": 1.0, "loss": 0.9}, {"w1": None, "loss": 0.2}]
    root = project(
        tmp_path,
        {
            "r.json": json.dumps({"points": points, "costs": {"import torch, once": 0.95}}),
            "README.md": "[0][mixed] [0][none] [0][two] [0][cost]\n\n"
            '[mixed]: r.json "points.[w1=0.01,w2=1].loss .1f"\n[none]: r.json "points.[w1=None].loss .1f"\n'
            '[two]: r.json "points.[w1=0.01].loss .1f"\n[cost]: r.json "costs.import torch, once .2f"\n',
        },
    )
    assert [problem.message for problem in docfigures.write(root)] == ["[w1=0.01]: matches 2 items, expected one"]
    assert (root / "README.md").read_text().startswith("[0.9][mixed] [0.2][none] [0][two] [0.95][cost]\n")


def test_unsourced_flags_decimals_shares_and_times_and_spares_counts_code_and_reasons(tmp_path: Path):
    root = project(
        tmp_path,
        {
            "README.md": "Took 12.5 s and 40 s; 3 seeds, 55,000 images, d2l section 3.2, issue 18, MLflow 3.17,\n"
            "torch 2.14.1, 95% interval, `lr 0.1`, [0.5][x], [see](a-0.5.md).\n"
            "About 0.85<!--nofig d2l's figure--> and 2 s<!--nofig a constant-->.\n\n```sh\nsleep 0.5\n```\n"
            '<!--nofig-block a table of examples-->\n| 1.5 | 2.5 |\n\nthen 7%.\n\n[x]: r.json "a .1f"\n',
        },
    )
    assert [problem.message.split()[0] for problem in docfigures.unsourced(root)] == ["'12.5'", "'40", "'7%'"]


def test_form_catches_comments_long_lines_undefined_references_and_a_long_readme(tmp_path: Path):
    prose = "word " * 40
    root = project(
        tmp_path,
        {
            "README.md": "```python\nrows[0][1]\n```\n" + "line\n" * 167 + "[1][nowhere]\n",
            "docs/commented.md": "<!-- a comment -->" + ("x" * 50 + "\n") * 6,  # 18 of 324 characters
            "docs/long.md": f"{prose[:161]}\n| {prose} |\n```sh\n{prose}\n```\n{prose[:160]}\n",
            "docs/fine.md": "<!-- a comment -->" + ("x" * 50 + "\n") * 7,  # 18 of 375
        },
    )
    assert [str(problem) for problem in docfigures.form(root)] == [
        "README.md:171: [1][nowhere] has no [nowhere]: definition",
        "README.md:171: README has 171 lines, at most 170",
        "docs/commented.md:1: 5.6% of the page is inside <!-- -->, at most 5%",
        "docs/long.md:1: a prose line of 161 characters, at most 160",
    ]


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
