"""Figures in README.md and docs/*.md traced to the committed files they come from.

A figure is annotated where it stands, with an HTML comment that rendered Markdown hides:

    0.8721<!--fig reports/compare.json variants.d2l.test_accuracy_mean .4f-->
    `d2l`<!--fig reports/compare.json selection.champion s-->
    78.1<!--fig results/*/train.json per_seed.*.train_seconds|sum .1f--> s

FILE is JSON, YAML, CSV (rows by index) or Python (a module-level literal); a glob gives a list.
KEY is a dotted path, spaces allowed (`*` maps over every item, `[w1_std=0.01,w2_std=1.0]` picks the one list item with
those fields), then filters: sum mean min max len abs, *N /N, *KEY /KEY (another
value of the same file), atleast:N atmost:N (a goal: `met` or `not met`;
`>` cannot stand in a comment's arguments).
FORMAT is Python's format spec (`s` for text, which stands in backticks or **bold**).
A table or lines copied from a file sit between `<!--include FILE table N-->` and `<!--/include-->`.
A number that needs no source says why: `2 s<!--nofig MLflow's own constant-->`, or a paragraph or table
starts with `<!--nofig-block why-->`.

    python -m tools.docfigures --check   # list every figure that differs from its file (exit 1)
    python -m tools.docfigures --write   # rewrite every annotated figure and include from its file
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?%?"
FIGURE = re.compile(rf"(?P<token>`[^`\n]*`|\*\*[^*\n]+\*\*|{NUMBER})<!--fig (?P<args>[^>]*?)-->")
INCLUDE = re.compile(r"<!--include (?P<args>[^>]*?)-->\n(?P<body>.*?)<!--/include-->", re.S)
UNIT = r"(?:\s?(?:s|ms|min|minutes?|seconds?|hours?|h|GB|MB|KB|kB|GiB|MiB|KiB|points?)\b|%|x(?![\w.]))"
GROUP = rf"{NUMBER}(?:\s*(?:-|–|to|±)\s*{NUMBER})*{UNIT}?"
# Figure-looking: a decimal, or an integer with a unit of time, size or share.
LOOSE_FIGURE = re.compile(rf"(?<![\w.§])(?:\d+\.\d+|\d[\d,]*{UNIT})")
# Not figures: versions (three parts, or after a tool's name), dates, the interval's level.
NOT_FIGURES = re.compile(
    r"(?i)\b(?:python|mlflow|torch|pytorch|sqlalchemy|postgresql|dvc|numpy)\s+\d+(?:\.\d+)+\+?"
    r"|\d+\.\d+\.\d+|\d{4}-\d{2}-\d{2}|\b95%(?=\s+(?:interval|CI|Student))"
)
NOFIG = re.compile(rf"({GROUP})<!--nofig (?P<why>[^>]*?)-->")
FILTERS = {"sum": sum, "mean": statistics.fmean, "min": min, "max": max, "len": len, "abs": abs}


class FigureError(Exception):
    """A figure whose file, key or format cannot be read."""


@dataclass(frozen=True)
class Problem:
    page: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.message}"


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def load(path: Path) -> object:
    """A results file as plain Python values."""
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(text)
    if path.suffix == ".csv":
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(text.splitlines())]
    if path.suffix == ".py":
        return dict(_constants(ast.parse(text)))
    raise FigureError(f"{path.name}: got suffix {path.suffix!r}, expected .json, .yaml, .csv or .py")


def _constants(module: ast.Module):
    """Module-level NAME = literal, also NAME, OTHER = literal, call (the literal ones)."""
    for node in module.body:
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            pairs = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = list(zip(target.elts, node.value.elts))
            for name, value in pairs:
                if isinstance(name, ast.Name) and _is_literal(value):
                    yield name.id, ast.literal_eval(value)


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _number(text: str) -> object:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def key_parts(key: str) -> list[str]:
    """A dotted path's parts; a `[field=value,...]` selector is one part, dots inside it included."""
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", key)


def select(items: object, selector: str) -> object:
    """The one list item whose fields equal a `[field=value,...]` selector's values (numbers compared as numbers)."""
    wanted = [condition.partition("=")[::2] for condition in selector[1:-1].split(",")]
    matches = [
        item
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, dict) and all(_same(item.get(field), text) for field, text in wanted)
    ]
    if len(matches) != 1:
        raise FigureError(f"{selector}: matches {len(matches)} items, expected one")
    return matches[0]


def _same(value: object, text: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(text) == value
        except ValueError:
            return False
    return str(value) == text


def lookup(value: object, path: list[str]) -> object:
    """Follow a dotted path; `*` maps the rest of the path over every item, `[field=value]` picks one."""
    for index, part in enumerate(path):
        if part == "*":
            items = value.values() if isinstance(value, dict) else value
            return [lookup(item, path[index + 1 :]) for item in items]
        if part.startswith("["):
            value = select(value, part)
            continue
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise FigureError(f"no key {'.'.join(path[: index + 1])!r}") from None
    return value


def flatten(value: object) -> object:
    """Nested lists from `*` and globs as one list, for the filters."""
    if not isinstance(value, list):
        return value
    return [leaf for item in value for leaf in (flatten(item) if isinstance(item, list) else [item])]


def apply(value: object, name: str, data: object = None) -> object:
    """One filter: a reducer by name; *N and /N, or *KEY and /KEY (another value of the same file); atleast:N and
    atmost:N, a goal, which give `met` or `not met`."""
    if name in FILTERS:
        return FILTERS[name](flatten(value) if name != "abs" else value)
    goal = re.fullmatch(r"(atleast|atmost):([-+]?\d+(?:\.\d+)?)", name)
    if goal:
        reached = value >= float(goal[2]) if goal[1] == "atleast" else value <= float(goal[2])
        return "met" if reached else "not met"
    if name[:1] in ("*", "/") and len(name) > 1:
        factor = float(name[1:]) if re.fullmatch(r"\d+(\.\d+)?", name[1:]) else lookup(data, key_parts(name[1:]))
        return value * factor if name[0] == "*" else value / factor
    raise FigureError(f"filter {name!r}: expected one of {', '.join(FILTERS)}, *N, /N, *KEY, /KEY, atleast:N, atmost:N")


def resolve(root: Path, file: str, key: str) -> object:
    """The value a figure names: FILE (a glob gives a list over its sorted matches) and KEY with filters."""
    path, *filters = key.split("|")
    matches = sorted(root.glob(file)) if any(c in file for c in "*?[") else [root / file]
    if not matches or not matches[0].exists():
        raise FigureError(f"{file}: no such file")
    loaded = [load(match) for match in matches]
    values = [lookup(data, key_parts(path)) for data in loaded]
    single = len(matches) == 1 and file == str(matches[0].relative_to(root))
    value = values[0] if single else values
    for name in filters:
        value = apply(value, name, loaded[0] if single else None)
    return value


def render(value: object, spec: str) -> str:
    """The value as the page shows it."""
    if spec == "s":
        return str(value)
    if spec.endswith("d") and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return format(value, spec)
    except (ValueError, TypeError):
        raise FigureError(f"cannot format {value!r} with {spec!r}") from None


def expected(root: Path, args: str, token: str) -> str:
    """What an annotated token should read, delimiters kept."""
    parts = args.split()
    if len(parts) < 3:
        raise FigureError(f"<!--fig {args}-->: expected FILE KEY FORMAT")
    # A key may hold spaces (a benchmark's cost names): it is everything between the file and the format.
    text = render(resolve(root, parts[0], " ".join(parts[1:-1])), parts[-1])
    for mark in ("`", "**"):
        if token.startswith(mark):
            return f"{mark}{text}{mark}"
    return text


def included(root: Path, args: str) -> str:
    """The lines an include names: `FILE table N` (the Nth Markdown table) or `FILE lines A-B`."""
    parts = args.split()
    if len(parts) != 3 or parts[1] not in ("table", "lines"):
        raise FigureError(f"<!--include {args}-->: expected FILE table N or FILE lines A-B")
    path = root / parts[0]
    if not path.exists():
        raise FigureError(f"{parts[0]}: no such file")
    lines = path.read_text().splitlines()
    if parts[1] == "lines":
        first, _, last = parts[2].partition("-")
        return "\n".join(lines[int(first) - 1 : int(last or first)]) + "\n"
    tables = re.findall(r"(?m)(?:^\|.*\n?)+", path.read_text())
    if int(parts[2]) > len(tables):
        raise FigureError(f"{parts[0]} has {len(tables)} tables, not {parts[2]}")
    return tables[int(parts[2]) - 1].rstrip("\n") + "\n"


def refresh(root: Path, text: str) -> tuple[str, list[tuple[int, str]]]:
    """The page with every figure and include rewritten from its file, and what could not be read."""
    errors: list[tuple[int, str]] = []

    def figure(match: re.Match) -> str:
        try:
            return expected(root, match["args"], match["token"]) + f"<!--fig {match['args']}-->"
        except FigureError as error:
            errors.append((match.start(), str(error)))
            return match[0]

    def include(match: re.Match) -> str:
        try:
            body = included(root, match["args"])
        except FigureError as error:
            errors.append((match.start(), str(error)))
            return match[0]
        return f"<!--include {match['args']}-->\n{body}<!--/include-->"

    return FIGURE.sub(figure, INCLUDE.sub(include, text)), errors


def check(root: Path = ROOT) -> list[Problem]:
    """Every figure or include that differs from its file or cannot be read."""
    problems = []
    for page in pages(root):
        text, name = page.read_text(), str(page.relative_to(root))
        fresh, errors = refresh(root, text)
        problems += [Problem(name, text.count("\n", 0, at) + 1, message) for at, message in errors]
        old_lines, new_lines = text.splitlines(), fresh.splitlines()
        if len(old_lines) != len(new_lines):
            problems.append(Problem(name, 1, "an include changes its length: run python -m tools.docfigures --write"))
            continue
        for number, (old, new) in enumerate(zip(old_lines, new_lines), 1):
            if old != new:
                problems.append(Problem(name, number, f"stale: {_changed(old, new)}"))
    return problems


def _changed(old: str, new: str) -> str:
    """The first differing figure on a line, as `page has X, file says Y`."""
    for before, after in zip(FIGURE.finditer(old), FIGURE.finditer(new)):
        if before["token"] != after["token"]:
            return f"page has {before['token']}, {after['args'].split()[0]} says {after['token']}"
    return "an included line differs from its file"


def mask(text: str) -> str:
    """The page's prose: code, comments, links, includes, sourced and exempted figures blanked, lines kept."""
    blank = lambda match: re.sub(r"[^\n]", "§", match[0])
    for pattern in (
        r"(?ms)^```.*?^```",
        INCLUDE.pattern,
        r"(?ms)^<!--nofig-block [^>]*\S[^>]*-->.*?(?=\n\s*\n|\Z)",
        NOFIG.pattern.replace("(?P<why>[^>]*?)", r"[^>]*\S[^>]*"),
        FIGURE.pattern,
        r"<!--.*?-->",
        r"`[^`\n]*`",
        r"\]\([^)]*\)",
        r"https?://\S+",
        NOT_FIGURES.pattern,
    ):
        text = re.sub(pattern, blank, text, flags=re.S)
    return text


def unsourced(root: Path = ROOT) -> list[Problem]:
    """Figure-looking numbers in prose and tables with neither a source nor a reason."""
    problems = []
    for page in pages(root):
        prose = mask(page.read_text())
        for match in LOOSE_FIGURE.finditer(prose):
            line = prose.count("\n", 0, match.start()) + 1
            problems.append(
                Problem(str(page.relative_to(root)), line, f"{match[0]!r} has no <!--fig--> or <!--nofig-->")
            )
    return problems


def unnamed_machines(root: Path = ROOT) -> list[Problem]:
    """Sections quoting a file that records its `machine` must quote that machine too."""
    problems = []
    for page in pages(root):
        name = str(page.relative_to(root))
        for section in re.split(r"(?m)^(?=#)", page.read_text()):
            figures = [match["args"].split() for match in FIGURE.finditer(section)]
            named = {parts[0] for parts in figures if parts[1:2] == ["machine"]}
            for file in sorted({parts[0] for parts in figures} - named):
                if _records_machine(root / file):
                    heading = section.splitlines()[0] if section else ""
                    problems.append(Problem(name, 1, f"{heading!r} quotes {file} but not its machine"))
    return problems


def _records_machine(path: Path) -> bool:
    try:
        return path.exists() and path.suffix == ".json" and "machine" in json.loads(path.read_text())
    except (json.JSONDecodeError, TypeError):
        return False


def write(root: Path = ROOT) -> list[Problem]:
    """Rewrite every page from its files; return what could not be read."""
    problems = []
    for page in pages(root):
        text = page.read_text()
        fresh, errors = refresh(root, text)
        problems += [Problem(page.name, text.count("\n", 0, at) + 1, message) for at, message in errors]
        if fresh != text:
            page.write_text(fresh)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docfigures", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report figures that differ from their files")
    mode.add_argument("--write", action="store_true", help="rewrite figures from their files")
    args = parser.parse_args(argv)
    problems = write() if args.write else check()
    problems += unsourced() + unnamed_machines()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
