"""The retraining report for CI: what changed since a base revision, and did the numbers get better or worse.

Params and metrics diffs come from DVC itself (`dvc params diff`, `dvc metrics diff`); the variant and verdict
tables, champion and gates from the compare stage's outputs; the plots from `dvc plots diff`, drawn here as PNG
files with matplotlib (no Vega renderer needed) and embedded by relative path, which bin/ci-retrain turns into
images the provider can show. Exits 1 when no variant passes its gates (no champion) or a variant diverged that
did not diverge at the base, unless --no-fail.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline import config
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import pyplot, read_json, write_png

WORKSPACE = "workspace"  # how `dvc plots diff` names the revision being reported


def dvc(*args: str) -> str:
    """Run a dvc command from this environment and return its output."""
    command = [str(Path(sys.executable).parent / "dvc"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {' '.join(result.stderr.split())[:500]}")
    return result.stdout.strip()


def json_at(revision: str, path: Path) -> dict | None:
    """A JSON file as committed at `revision`, or None when it was not there."""
    result = subprocess.run(["git", "show", f"{revision}:{path.as_posix()}"], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def check_revision(revision: str) -> None:
    """A base that git does not know is the user's mistake, named in one line (DVC's own error is longer)."""
    result = subprocess.run(["git", "rev-parse", "-q", "--verify", f"{revision}^{{commit}}"], capture_output=True)
    if result.returncode != 0:
        raise PipelineError(f"--base {revision!r} is not a commit in this repository (expected e.g. HEAD~1)")


def new_divergences(params: config.Params, results: Path, base: str) -> list[str]:
    """Variants diverged now that had not diverged at the base (or did not exist there)."""
    newly = []
    for name in params.variants:
        now = read_json(results / name / "train.json")
        before = json_at(base, results / name / "train.json") or {}
        if now["diverged"] and not before.get("diverged"):
            newly.append(name)
    return newly


def _table_or(table: str, nothing: str) -> str:
    """DVC's Markdown diff, or a sentence when it has no rows (DVC prints the header alone)."""
    return table if len(table.splitlines()) > 2 else nothing


def champion_line(summary: dict) -> str:
    """Which variant was chosen (compare's run in MLflow says what it registered, under which alias)."""
    if not summary.get("champion"):
        return f"Champion: **none** ({summary.get('selection', {}).get('reason', 'no variant chosen')})"
    return f"Champion: **{summary['champion']}** ({summary.get('selection', {}).get('reason', '')})"


def training_run_ids(results: Path, variants) -> dict[str, str]:
    """variant -> the MLflow run that made its train.json (found by the MD5 tag), where the store has one."""
    import mlflow

    from pipeline import mlflow_runs, tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    found = {}
    for name in variants:
        try:
            run, _ = mlflow_runs.training_runs(name, results / name / "train.json")
        except Exception:  # noqa: BLE001 - the report goes on without the store
            run = None
        found[name] = run.info.run_id if run else "-"
    return found


def comparison_tables(report_path: Path) -> str:
    """The compare stage's tables (variants, then the pairwise verdicts), each with the sentence above it."""
    blocks = report_path.read_text().split("\n\n") if report_path.exists() else []
    kept = [block for index, block in enumerate(blocks) if block.startswith("|") or _before_table(blocks, index)]
    return "\n\n".join(kept) or "(no comparison table)"


def _before_table(blocks: list[str], index: int) -> bool:
    return index + 1 < len(blocks) and blocks[index + 1].startswith("|") and not blocks[index].startswith("#")


def plot_data(base: str, folder: Path) -> dict[str, list[dict]]:
    """`dvc plots diff` of the workspace against `base` as data: {plot id: [entries]}. Plots a revision cannot
    load (outputs in a DVC cache this job does not have) are left out by DVC itself."""
    output = dvc("plots", "diff", base, "--json", "--split", "-o", str(folder / "dvc"))
    try:
        return json.loads(output or "{}").get("data", {})
    except ValueError:
        raise PipelineError(f"`dvc plots diff {base} --json` printed no JSON: {output[:200]}") from None


def _field(content: Any, axis: str) -> str | None:
    """The field a Vega-Lite spec encodes on `axis` ('x' or 'y'), wherever the template put its encoding."""
    if isinstance(content, dict):
        encoding = content.get(axis)
        if isinstance(encoding, dict) and isinstance(encoding.get("field"), str) and encoding["field"] != "rev":
            return encoding["field"]
        values = content.values()
    elif isinstance(content, list):
        values = content
    else:
        return None
    return next((found for value in values if (found := _field(value, axis))), None)


def _marks(content: Any) -> set[str]:
    """Every mark type a Vega-Lite spec draws (`"mark": "line"` or `"mark": {"type": "rect"}`)."""
    if isinstance(content, list):
        return set().union(*map(_marks, content)) if content else set()
    if not isinstance(content, dict):
        return set()
    mark = content.get("mark")
    own = {mark} if isinstance(mark, str) else {mark.get("type")} if isinstance(mark, dict) else set()
    return own.union(*map(_marks, content.values()))


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def draw_vega(plot_id: str, entry: dict, path: Path) -> bool:
    """One `dvc plots diff` Vega plot as a PNG: a line per revision and file for numeric x (curves), a count
    matrix per revision and file otherwise (confusion). False when no revision's data differs from another's."""
    rows = entry["anchor_definitions"].get("<DVC_METRIC_DATA>") or []
    x_field, y_field = _field(entry["content"], "x"), _field(entry["content"], "y")
    if not rows or x_field is None or y_field is None:
        return False
    series: dict[tuple[str, str], list[tuple[Any, Any]]] = {}
    for row in rows:
        series.setdefault((row["rev"], row.get("filename", "")), []).append((row.get(x_field), row.get(y_field)))
    by_revision = {
        rev: sorted((name, points) for (each, name), points in series.items() if each == rev)
        for rev in entry["revisions"]
    }
    if len({json.dumps(value) for value in by_revision.values()}) < 2:
        return False
    numeric = all(_number(x) is not None for points in series.values() for x, _ in points)
    matrix = "rect" in _marks(entry["content"]) or not numeric  # DVC's confusion templates draw rects
    (_draw_matrices if matrix else _draw_curves)(plot_id, series, entry["revisions"], (x_field, y_field), path)
    return True


def _draw_curves(plot_id: str, series: dict, revisions: list[str], fields: tuple[str, str], path: Path) -> None:
    """One color per file; this run solid, the base dashed and faded."""
    names = sorted({name for _, name in series})
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for (rev, name), points in sorted(series.items(), key=lambda item: (item[0][0] == WORKSPACE, item[0][1])):
        values = sorted((_number(x), _number(y)) for x, y in points)
        now = rev == WORKSPACE
        color = f"C{names.index(name) % 10}"
        axis.plot(
            *zip(*values),
            "-" if now else "--",
            color=color,
            alpha=1 if now else 0.5,
            label=f"{name} ({_revision_label(rev)})",
        )
    axis.set(title=plot_id, xlabel=fields[0], ylabel=fields[1])
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    write_png(path, figure)


def _draw_matrices(plot_id: str, series: dict, revisions: list[str], fields: tuple[str, str], path: Path) -> None:
    names = sorted({name for _, name in series})
    plt = pyplot()
    figure, axes = plt.subplots(len(names), len(revisions), figsize=(3 * len(revisions), 3 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for column, rev in enumerate(revisions):
            labels, counts = _counts(series.get((rev, name), []))
            axis = axes[row][column]
            axis.imshow(counts or [[0]], cmap="Blues")
            axis.set_xticks(range(len(labels)), labels, fontsize=6)
            axis.set_yticks(range(len(labels)), labels, fontsize=6)
            title = f"{name} ({_revision_label(rev)})" if name else _revision_label(rev)
            axis.set(title=title, xlabel=fields[0], ylabel=fields[1])
    figure.suptitle(plot_id)
    figure.tight_layout()
    write_png(path, figure)


def _counts(pairs: list[tuple[Any, Any]]) -> tuple[list[str], list[list[int]]]:
    """A confusion matrix from (x, y) records: the labels, and counts[y][x]."""
    labels = sorted({str(value) for pair in pairs for value in pair}, key=_label_order)
    index = {label: position for position, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for x, y in pairs:
        counts[index[str(y)]][index[str(x)]] += 1
    return labels, counts


def _label_order(label: str) -> tuple:
    """Numeric labels by value (2 before 10), then the rest by name."""
    number = _number(label)
    return (number is None, number or 0.0, label)


def draw_images(plot_id: str, entries: list[dict], path: Path) -> bool:
    """An image plot at the base and now, side by side; False when it is not made now or did not change."""
    images = {entry["revisions"][0]: Path(entry["url"]) for entry in entries if entry.get("url")}
    contents = {rev: image.read_bytes() for rev, image in images.items() if image.exists()}
    if WORKSPACE not in contents or (len(contents) > 1 and len(set(contents.values())) == 1):
        return False
    plt = pyplot()
    figure, axes = plt.subplots(1, len(contents), figsize=(6 * len(contents), 5), squeeze=False)
    for axis, rev in zip(axes[0], sorted(contents, key=lambda rev: rev != WORKSPACE)):
        axis.imshow(plt.imread(images[rev]))
        axis.set_title(_revision_label(rev))
        axis.axis("off")
    figure.suptitle(plot_id)
    figure.tight_layout()
    write_png(path, figure)
    return True


def _revision_label(rev: str) -> str:
    return "this run" if rev == WORKSPACE else f"base {rev[:12]}"


def plots_section(base: str, folder: Path) -> str:
    """Markdown for the plots that changed since `base`, each a PNG in `folder` linked by its path."""
    drawn, unchanged = [], []
    for plot_id, entries in plot_data(base, folder).items():
        path = folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", plot_id).removesuffix(".png") + ".png")
        vega = [entry for entry in entries if entry.get("type") == "vega"]
        changed = draw_vega(plot_id, vega[0], path) if vega else draw_images(plot_id, entries, path)
        (drawn if changed else unchanged).append((plot_id, path))
    lines = [f"![{plot_id}]({path.as_posix()})" for plot_id, path in drawn] or ["No plot changed."]
    if unchanged:
        lines.append("Unchanged: " + ", ".join(f"`{plot_id}`" for plot_id, _ in unchanged) + ".")
    return "\n\n".join(lines)


def build(
    params: config.Params, base: str, results: Path, summary_path: Path, report_path: Path, plots: Path | None
) -> tuple[str, list[str]]:
    """The Markdown report and the list of reasons it fails (empty when it passes)."""
    summary = read_json(summary_path)
    problems = []
    if summary["champion"] is None:
        problems.append(f"no champion: {summary['selection']['reason']}")
    problems += [f"variant {name} diverged (it did not at {base})" for name in new_divergences(params, results, base)]
    lines = [
        f"# Retraining report (against `{base}`)",
        "",
        "## Verdict",
        "",
        "**FAIL**: " + "; ".join(problems) if problems else "**PASS**",
        "",
        "## Params changed",
        "",
        _table_or(dvc("params", "diff", base, "--md"), "No params changed."),
        "",
        "## Metrics changed",
        "",
        _table_or(dvc("metrics", "diff", base, "--md"), "No metrics changed."),
        "",
        "## Variants",
        "",
        comparison_tables(report_path),
        "",
        champion_line(summary),
        "",
    ]
    if plots is not None:
        lines += ["## Plots", "", plots_section(base, plots), ""]
    lines += ["## MLflow runs", "", "| variant | run id |", "|---|---|"]
    for name, run_id in training_run_ids(results, summary["variants"]).items():
        lines.append(f"| {name} | `{run_id}` |")
    lines.append("")
    return "\n".join(lines), problems


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against, e.g. HEAD~1 or origin/main")
    parser.add_argument("--params", type=Path, default=config.DEFAULT_PARAMS)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--summary", type=Path, default=Path("reports/compare.json"))
    parser.add_argument("--table", type=Path, default=Path("reports/compare.md"))
    parser.add_argument("--plots", type=Path, help="draw `dvc plots diff` into this folder and embed the PNG files")
    parser.add_argument("--output", type=Path, help="also write the report here (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when the verdict is FAIL")
    args = parser.parse_args()
    params = config.load(args.params)
    check_revision(args.base)
    report, problems = build(params, args.base, args.results, args.summary, args.table, args.plots)
    print(report)
    if args.output:
        with open(args.output, "a") as output:
            output.write(report + "\n")
    if problems and not args.no_fail:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
