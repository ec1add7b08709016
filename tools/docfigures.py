"""Figures in README.md and docs/*.md traced to the committed files they come from, and pages that read as plain text.

A figure quoted in prose or a hand-made table is a Markdown reference link whose definition names its source;
rendered, the figure links to its file, and the raw text stays short:

    d2l's settings reach [0.871][d2l test] mean test accuracy.

    [d2l test]: reports/compare.json "variants.d2l.test_accuracy_mean .3f"

The definition's path is relative to the page (as any link's is); its title is KEY FORMAT. KEY is a dotted path,
spaces allowed (`*` maps over every item, `[w1_std=0.01,w2_std=1.0]` picks the one list item with those fields),
then filters: sum mean min max len abs, *N /N, *KEY /KEY (another value of the same file), atleast:N atmost:N
(a goal: `met` or `not met`). FORMAT is Python's format spec (`s` for text, which stands in backticks or **bold**:
[`d2l`][champion]). FILE is JSON, YAML, CSV (rows by index) or Python (a module-level literal); a glob gives a list.
The same figure may stand inline, `0.871<!--fig reports/compare.json variants.d2l.test_accuracy_mean .3f-->`, with
FILE relative to the repository's root; the reference form keeps the page readable.

A table copied from a report sits between `<!--include FILE table N-->` and `<!--/include-->` (FILE from the root;
`FILE lines A-B` copies lines). A decimal, a percentage or a time in prose that comes from no file says why:
`2 s<!--nofig MLflow's own constant-->`, or a paragraph or table starts with `<!--nofig-block why-->`; a constant
can also stand as code (`lr 0.1`). Integers and section numbers need nothing.

Two checks, because they fail for different reasons:
- the pages' form (`form`): every figure-looking number sourced or excused, every reference defined, at most 5%
  of a page inside comments, no prose line over 160 characters, README within 170 lines. It depends on the pages
  only, so the fast test tier runs it.
- freshness (`check`): every figure and include equals what its file says now. Committed results may be older than
  the code, so this runs after the pipeline, in CI: `python -m tools.docfigures --check`.

    python -m tools.docfigures --check   # both checks; list every problem (exit 1)
    python -m tools.docfigures --write   # rewrite every figure and include from its file, then check the form
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMENT_SHARE = 0.05  # at most this share of a page's characters inside <!-- -->
LINE_LIMIT = 160  # characters in a prose line (tables and code blocks may be wider)
README_LINES = 170
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?%?"
TOKEN = rf"`[^`\n]*`|\*\*[^*\n]+\*\*|{NUMBER}"
FIGURE = re.compile(rf"(?P<token>{TOKEN})<!--fig (?P<args>[^>]*?)-->")
REFERENCE = re.compile(rf"\[(?P<token>{TOKEN})\]\[(?P<label>[^\]\n]+)\]")
DEFINITION = re.compile(r'(?m)^ {0,3}\[(?P<label>[^\]\n]+)\]:[ \t]+(?P<path>\S+)(?:[ \t]+"(?P<args>[^"\n]*)")?[ \t]*$')
INCLUDE = re.compile(r"<!--include (?P<args>[^>]*?)-->\n(?P<body>.*?)<!--/include-->", re.S)
UNIT = r"(?:\s?(?:s|ms|min|minutes?|seconds?|hours?|h|GB|MB|KB|kB|GiB|MiB|KiB|points?)\b|%|x(?![\w.]))"
GROUP = rf"{NUMBER}(?:\s*(?:-|–|to|±)\s*{NUMBER})*{UNIT}?"
# Figure-looking: a decimal, a percentage or a time. Integers alone are counts, and need no source.
LOOSE_FIGURE = re.compile(r"(?<![\w.§])(?:\d+\.\d+|\d[\d,]*(?:%|\s?(?:s|ms|min|minutes?|seconds?|hours?)\b))")
# Not figures: versions (three parts, or after a tool's name), dates, the interval's level, section numbers.
NOT_FIGURES = re.compile(
    r"(?i)\b(?:python|mlflow|torch|pytorch|sqlalchemy|postgresql|dvc|numpy)\s+\d+(?:\.\d+)+\+?"
    r"|\d+\.\d+\.\d+|\d{4}-\d{2}-\d{2}|\b95%(?=\s+(?:interval|CI|Student))|\b(?:section|chapter)\s+\d+(?:\.\d+)+"
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


def _label(text: str) -> str:
    """A reference label as Markdown matches it: case and runs of spaces do not count."""
    return " ".join(text.lower().split())


def definitions(root: Path, page: Path, text: str) -> dict[str, tuple[str, str] | None]:
    """Every reference definition on a page: a figure's (FILE from the root, KEY FORMAT), None for a plain link."""
    folder = os.path.relpath(page.parent, root)
    found: dict[str, tuple[str, str] | None] = {}
    for match in DEFINITION.finditer(text):
        local = not re.match(r"[a-z][a-z0-9+.-]*:|#", match["path"])
        source = (Path(os.path.normpath(os.path.join(folder, match["path"]))).as_posix(), match["args"])
        found.setdefault(_label(match["label"]), source if local and match["args"] else None)
    return found


def refresh(root: Path, page: Path, text: str) -> tuple[str, list[tuple[int, str]]]:
    """The page with every figure and include rewritten from its file, and (line, error) for what could not be read."""
    errors: list[tuple[int, str]] = []
    sources = definitions(root, page, text)

    def rewrite(pattern: re.Pattern, text: str, new) -> str:
        def one(match: re.Match) -> str:
            try:
                return new(match)
            except FigureError as error:
                errors.append((text.count("\n", 0, match.start()) + 1, str(error)))
                return match[0]

        return pattern.sub(one, text)

    def reference(match: re.Match) -> str:
        source = sources.get(_label(match["label"]))
        if source is None:  # a plain link; an undefined label is the form check's to report
            return match[0]
        return f"[{expected(root, f'{source[0]} {source[1]}', match['token'])}][{match['label']}]"

    text = rewrite(INCLUDE, text, lambda m: f"<!--include {m['args']}-->\n{included(root, m['args'])}<!--/include-->")
    text = rewrite(FIGURE, text, lambda m: expected(root, m["args"], m["token"]) + f"<!--fig {m['args']}-->")
    return rewrite(REFERENCE, text, reference), errors


def check(root: Path = ROOT) -> list[Problem]:
    """Every figure or include that differs from its file or cannot be read."""
    problems = []
    for page in pages(root):
        text, name = page.read_text(), str(page.relative_to(root))
        fresh, errors = refresh(root, page, text)
        problems += [Problem(name, line, message) for line, message in errors]
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
    tokens = re.compile(f"{FIGURE.pattern}|{REFERENCE.pattern.replace('?P<token>', '?P<reference>')}")
    for before, after in zip(tokens.finditer(old), tokens.finditer(new)):
        was, now = before["token"] or before["reference"], after["token"] or after["reference"]
        if was != now:
            return f"page has {was}, its file says {now}"
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
        REFERENCE.pattern,
        DEFINITION.pattern,
        r"<!--.*?-->",
        r"`[^`\n]*`",
        r"\]\([^)]*\)",
        r"https?://\S+",
        NOT_FIGURES.pattern,
    ):
        text = re.sub(pattern, blank, text, flags=re.S)
    return text


def unsourced(root: Path = ROOT) -> list[Problem]:
    """Decimals, percentages and times in prose and tables with neither a source nor a reason."""
    problems = []
    for page in pages(root):
        prose = mask(page.read_text())
        for match in LOOSE_FIGURE.finditer(prose):
            line = prose.count("\n", 0, match.start()) + 1
            message = f"{match[0]!r} has no source ([figure][label] and its definition) and no <!--nofig why-->"
            problems.append(Problem(str(page.relative_to(root)), line, message))
    return problems


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(number, line) for every line outside fenced code blocks and tables."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and not line.lstrip().startswith("|"):
            lines.append((number, line))
    return lines


def comment_share(text: str) -> float:
    """The share of a page's characters that sit inside <!-- -->, the delimiters included."""
    return sum(len(comment) for comment in re.findall(r"<!--.*?-->", text, re.S)) / max(len(text), 1)


def form(root: Path = ROOT) -> list[Problem]:
    """What makes a page hard to read raw or a figure impossible to check, from the pages alone."""
    problems = unsourced(root)
    for page in pages(root):
        text, name = page.read_text(), str(page.relative_to(root))
        problems += [Problem(name, line, message) for line, message in page_form(root, page, text)]
    return problems


def page_form(root: Path, page: Path, text: str) -> list[tuple[int, str]]:
    """(line, problem) for one page: its comment share, long prose lines, undefined references, README's length."""
    problems = []
    if comment_share(text) > COMMENT_SHARE:
        problems.append((1, f"{comment_share(text):.1%} of the page is inside <!-- -->, at most {COMMENT_SHARE:.0%}"))
    for number, line in prose_lines(text):
        if len(line) > LINE_LIMIT:
            problems.append((number, f"a prose line of {len(line)} characters, at most {LINE_LIMIT}"))
    defined = definitions(root, page, text)
    outside_code = re.sub(r"(?ms)^```.*?^```", lambda block: re.sub(r"[^\n]", " ", block[0]), text)
    for match in REFERENCE.finditer(outside_code):
        if _label(match["label"]) not in defined:
            line = text.count("\n", 0, match.start()) + 1
            problems.append((line, f"{match[0]} has no [{match['label']}]: definition"))
    lines = text.count("\n")
    if page == root / "README.md" and lines > README_LINES:
        problems.append((README_LINES + 1, f"README has {lines} lines, at most {README_LINES}"))
    return problems


def write(root: Path = ROOT) -> list[Problem]:
    """Rewrite every page from its files; return what could not be read."""
    problems = []
    for page in pages(root):
        text = page.read_text()
        fresh, errors = refresh(root, page, text)
        problems += [Problem(str(page.relative_to(root)), line, message) for line, message in errors]
        if fresh != text:
            page.write_text(fresh)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docfigures", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="report figures that differ from their files, and the form")
    mode.add_argument("--write", action="store_true", help="rewrite figures from their files, then check the form")
    args = parser.parse_args(argv)
    problems = (write() if args.write else check()) + form()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
