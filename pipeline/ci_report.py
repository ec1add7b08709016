"""The retraining report for CI: what changed since a base revision, and did the numbers get better or worse.

Params and metrics diffs come from DVC itself (`dvc params diff`, `dvc metrics diff`); the variant table,
champion and gates from the compare stage's outputs. Exits 1 when no variant passes its gates (no
champion) or a variant diverged that did not diverge at the base, unless --no-fail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline import config
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.files import read_json


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


def new_divergences(params: config.Params, results: Path, base: str) -> list[str]:
    """Variants diverged now that had not diverged at the base (or did not exist there)."""
    newly = []
    for name in params.variants:
        now = read_json(results / name / "train.json")
        before = json_at(base, results / name / "train.json") or {}
        if now["diverged"] and not before.get("diverged"):
            newly.append(name)
    return newly


def champion_line(summary: dict) -> str:
    """Which variant was chosen, and what was registered under which alias."""
    registered = summary.get("registered")
    if not registered:
        return "Champion: **none**"
    return (
        f"Champion: **{summary['champion']}** (registered as `{registered['name']}` version {registered['version']}, "
        f"seed {registered['seed']}, alias `{registered['alias']}`: {registered['why']})"
    )


def build(
    params: config.Params, base: str, results: Path, summary_path: Path, report_path: Path, curves: Path
) -> tuple[str, list[str]]:
    """The Markdown report and the list of reasons it fails (empty when it passes)."""
    summary = read_json(summary_path)
    problems = []
    if summary["champion"] is None:
        problems.append(f"no champion: {summary['selection']['reason']}")
    problems += [f"variant {name} diverged (it did not at {base})" for name in new_divergences(params, results, base)]
    blocks = report_path.read_text().split("\n\n") if report_path.exists() else []
    table = next((block for block in blocks if block.startswith("|")), "(no comparison table)")
    lines = [
        f"# Retraining report (against `{base}`)",
        "",
        "## Verdict",
        "",
        "**FAIL**: " + "; ".join(problems) if problems else "**PASS**",
        "",
        "## Params changed",
        "",
        dvc("params", "diff", base, "--md") or "No params changed.",
        "",
        "## Metrics changed",
        "",
        dvc("metrics", "diff", base, "--md") or "No metrics changed.",
        "",
        "## Variants",
        "",
        table,
        "",
        champion_line(summary),
        "",
        f"Curves: `{curves}`; per-variant confusion matrices: `reports/evaluation/<variant>-confusion.png`.",
        "",
        "## MLflow runs",
        "",
        "| variant | run id |",
        "|---|---|",
    ]
    for name in summary["variants"]:
        lines.append(f"| {name} | `{read_json(results / name / 'train.json')['mlflow_run_id']}` |")
    lines += [f"| compare | `{summary.get('mlflow_run_id')}` |", ""]
    return "\n".join(lines), problems


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against, e.g. HEAD~1 or origin/main")
    parser.add_argument("--params", type=Path, default=config.DEFAULT_PARAMS)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--summary", type=Path, default=Path("reports/compare.json"))
    parser.add_argument("--table", type=Path, default=Path("reports/compare.md"))
    parser.add_argument("--curves", type=Path, default=Path("reports/curves.png"))
    parser.add_argument("--output", type=Path, help="also write the report here (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when the verdict is FAIL")
    args = parser.parse_args()
    params = config.load(args.params)
    report, problems = build(params, args.base, args.results, args.summary, args.table, args.curves)
    print(report)
    if args.output:
        with open(args.output, "a") as output:
            output.write(report + "\n")
    if problems and not args.no_fail:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
