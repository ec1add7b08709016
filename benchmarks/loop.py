"""Benchmark of the loop users repeat: change one variant's lr, `dvc repro`, look.

`python -m benchmarks.loop [--rounds 3] [--variant d2l]` copies this
repository (tracked and untracked files; data/raw and data/prepared when the workspace has them) into a
temporary directory, runs `dvc repro` there once, then per round sets a new `variants.<variant>.lr` and times
`dvc repro`: wall seconds, training seconds (what the train stage reports), the overhead (wall minus
training) and each stage's share, timed from DVC's streamed "Running stage" lines. The last line is JSON
with the medians. Target: overhead <= 18 s with train and evaluate as plain processes, through fewer imports, no daemon.

`python -m benchmarks.loop --costs` instead prints what one fresh stage process pays before and around its
work (medians of --rounds fresh processes): the interpreter, importing torch and MLflow, and each MLflow call
a train stage makes, against an embedded store that already exists (as in the loop) in a throwaway git repo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.bench import RESULTS, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = ("data/raw", "data/prepared")
RUNNING = re.compile(r"Running stage '([^']+)'")
STAGE_END = re.compile(r"Updating lock file|Running stage '")
TRAINED = re.compile(r"^trained \d+ seeds in ([\d.]+) s$")  # the train stage's last line


def copy_repository(into: Path) -> Path:
    """The working tree's files (not its outputs or MLflow store), as a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)
    for data in DATA:
        if any((REPO / data).glob("*")):
            shutil.copytree(REPO / data, into / data, dirs_exist_ok=True)
    git = {
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "benchmark copy"]):
        subprocess.run(["git", *command], cwd=into, check=True, env={**os.environ, **git})
    return into


# One stage's MLflow calls, timed in a fresh process: the seeds log 10 epochs each, the best seed logs its model.
STAGE_CALLS = """
import json, time
started = time.perf_counter()
seconds = {}
def took(name):
    global started
    now = time.perf_counter()
    seconds[name] = now - started
    started = now
import torch; took("import torch")
import mlflow; took("import mlflow")
from pipeline import model, serving, tracking
took("import our helpers")
with tracking.logged_run("train", "costs", variant="d2l"):
    took("logged_run start (store, experiment, close_orphans, lineage, start_run)")
    mlflow.log_params({f"param_{index}": index for index in range(12)}); took("log_params")
    for seed in range(3):
        with tracking.child_run(f"seed {seed}", tracking.lineage_tags("train", "d2l")):
            for epoch in range(10):
                mlflow.log_metrics({"train_loss": 0.5, "validation_accuracy": 0.8}, step=epoch)
    took("3 seed runs, 10 epochs of log_metrics each")
    net, architecture = model.module_mlp((256,), "relu"), {"impl": "module", "hidden": [256], "activation": "relu"}
    serving.log_model(net, architecture, 0.29, 0.35, tuple("0123456789"))
    took("log_model")
took("end_run")
print(json.dumps(seconds))
"""


def fresh_seconds(code: str, cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def process_costs(rounds: int) -> dict[str, float]:
    """Medians over `rounds` fresh processes of what a stage pays outside its own work."""
    work = Path(tempfile.mkdtemp(prefix="d2l-costs-"))
    try:
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_ROOT": str(work)}
        env.pop("MLFLOW_TRACKING_URI", None)
        subprocess.run([sys.executable, "-c", STAGE_CALLS], cwd=work, env=env, check=True, capture_output=True)
        samples = []
        for _ in range(rounds):
            interpreter = fresh_seconds("pass", work, env)
            calls = subprocess.run(
                [sys.executable, "-c", STAGE_CALLS], cwd=work, env=env, check=True, capture_output=True, text=True
            )
            samples.append({"interpreter start and exit": interpreter, **json.loads(calls.stdout.splitlines()[-1])})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {name: round(statistics.median(sample[name] for sample in samples), 3) for name in samples[0]}


def set_lr(params: Path, variant: str, lr: float) -> None:
    values = yaml.safe_load(params.read_text())
    values["variants"][variant]["lr"] = lr
    params.write_text(yaml.safe_dump(values, sort_keys=False))


def repro(copy: Path, env: dict) -> tuple[float, list[tuple[float, str]]]:
    """`dvc repro` in the copy: its wall seconds and each output line with its time since the start."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=copy,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=1,
    )
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stdout]
    wall = time.perf_counter() - started
    if process.wait() != 0:
        sys.exit(
            f"dvc repro in {copy} failed (exit status {process.returncode}):\n"
            + "\n".join(line for _, line in lines[-40:])
        )
    return wall, lines


def stage_seconds(wall: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """From each "Running stage 'x'" to DVC's next lock update or stage; the rest is DVC's own time."""
    seconds: dict[str, float] = {}
    for index, (started, line) in enumerate(lines):
        match = RUNNING.search(line)
        if match:
            ended = next((when for when, later in lines[index + 1 :] if STAGE_END.search(later)), wall)
            seconds[match.group(1)] = ended - started
    seconds["dvc (status, locks, between stages)"] = wall - sum(seconds.values())
    return seconds


def training_seconds(lines: list[tuple[float, str]]) -> float:
    """What the train stage reports on its last line (the seconds are in MLflow, not in its outputs)."""
    return sum(float(match.group(1)) for _, line in lines if (match := TRAINED.match(line.strip())))


def measure(copy: Path, env: dict, variant: str, lr: float) -> dict:
    set_lr(copy / "params.yaml", variant, lr)
    wall, lines = repro(copy, env)
    ran = [RUNNING.search(line).group(1) for _, line in lines if RUNNING.search(line)]
    if f"train@{variant}" not in ran:
        sys.exit(f"dvc repro did not retrain {variant} (ran: {ran})")
    train = training_seconds(lines)
    return {"wall_s": wall, "train_s": train, "overhead_s": wall - train, "stages": stage_seconds(wall, lines)}


def show(round_number: int, result: dict) -> None:
    stages = "  ".join(f"{name} {seconds:.1f}" for name, seconds in result["stages"].items())
    print(
        f"round {round_number} wall {result['wall_s']:5.1f} s  train {result['train_s']:4.1f} s  "
        f"overhead {result['overhead_s']:5.1f} s  | {stages}",
        flush=True,
    )


def medians(results: list[dict]) -> dict:
    names = dict.fromkeys(name for result in results for name in result["stages"])
    stages = {
        name: round(statistics.median(result["stages"].get(name, 0.0) for result in results), 2) for name in names
    }
    return {
        **{
            key: round(statistics.median(result[key] for result in results), 2)
            for key in ("wall_s", "train_s", "overhead_s")
        },
        "stages": stages,
    }


def run_rounds(copy: Path, rounds: int, variant: str, env: dict) -> list[dict]:
    results = []
    lr = 0.1
    for round_number in range(1, rounds + 1):
        lr = round(lr + 0.001, 6)  # never a value seen before: DVC's run cache would skip the stage
        results.append(measure(copy, env, variant, lr))
        show(round_number, results[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default="d2l")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and print its path")
    parser.add_argument("--costs", action="store_true", help="per-process costs of a stage instead of the loop")
    args = parser.parse_args()
    if args.costs:
        costs = process_costs(args.rounds)
        print(json.dumps(costs, indent=1))
        write_result(
            RESULTS / "loop_costs.json",
            {"rounds": args.rounds, **costs},
            ["python", "-m", "benchmarks.loop", *sys.argv[1:]],
        )
        return
    work = Path(tempfile.mkdtemp(prefix="d2l-loop-"))
    copy = copy_repository(work / "repo")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own store
    try:
        wall, _ = repro(copy, env)
        print(f"setup: dvc repro in {copy} took {wall:.1f} s", flush=True)
        results = run_rounds(copy, args.rounds, args.variant, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"rounds": args.rounds, "variant": args.variant, "target_overhead_s": 18, **medians(results)}
    print(json.dumps(result))
    write_result(RESULTS / "loop.json", result, ["python", "-m", "benchmarks.loop", *sys.argv[1:]])


if __name__ == "__main__":
    main()
