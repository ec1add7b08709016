"""Stage `interventions`: what makes N(0, 1) train or not, by changing one thing at a time at chosen inits.

At each of interventions.points (W1 std, W2 std), on both input scalings, for interventions.epochs from each seed,
with train's lr and batch size (recipes in pipeline/interventions.py):
- baseline: SGD as d2l trains;
- temperature, both ways, with c^2 = interventions.temperature: the point scaled down by c with its logits times
  c^2 (b2 at lr / c^2) is the baseline's exact twin, and the point itself with its logits divided by c^2 (b2 at
  lr * c^2) is the twin of plain SGD from the point scaled down by c (trained here too, as its reference); a
  twin pair should follow one trajectory, and the JSON gives how far apart they ended;
- weight decay at each strength (breaks the conserved quantity); Adam at interventions.adam_lr.
Each intervention's effect on the gate (train loss < evaluate.max_train_loss after the last epoch) is stated
against the baseline's. Chunks (one input scaling and recipe) run through pipeline/executor.py; this process logs
every model's MLflow run and writes the outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline import cli, config, cpu, tracking
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.executor import run_chunks
from pipeline.files import write_json, write_text
from pipeline.interventions import Chunk, Recipe, load_shared, log_model_runs, seed_summary, train_chunk
from pipeline.spread import mean_and_std


@dataclass(frozen=True)
class Arm:
    """One intervention at one point: its init, its recipe, and the arm whose trajectory it should follow."""

    point: str
    name: str
    init: tuple[float, float]
    recipe: Recipe
    twin_of: str | None = None


def label(w1: float, w2: float) -> str:
    return f"W1 {w1:g}, W2 {w2:g}"


def arms(section: config.InterventionsParams, lr: float) -> list[Arm]:
    """Every point's interventions, baseline first."""
    found, scale = [], section.temperature
    c = math.sqrt(scale)
    for w1, w2 in section.points:
        point, cooler = label(w1, w2), (w1 / c, w2 / c)
        found += [
            Arm(point, "baseline", (w1, w2), Recipe(lr=lr)),
            Arm(point, f"{label(*cooler)}, logits x {scale:g}", cooler, Recipe(lr=lr, logit_scale=scale,
                b2_lr_factor=1 / scale), twin_of="baseline"),
            Arm(point, f"reference: plain SGD at {label(*cooler)}", cooler, Recipe(lr=lr)),
            Arm(point, f"logits / {scale:g}", (w1, w2), Recipe(lr=lr, logit_scale=1 / scale, b2_lr_factor=scale),
                twin_of=f"reference: plain SGD at {label(*cooler)}"),
        ]  # fmt: skip
        found += [
            Arm(point, f"weight decay {wd:g}", (w1, w2), Recipe(lr=lr, weight_decay=wd)) for wd in section.weight_decay
        ]
        found.append(Arm(point, "adam", (w1, w2), Recipe("adam", section.adam_lr)))
    return found


def chunks(section, train: config.TrainParams) -> list[tuple[Chunk, list[Arm]]]:
    """Per input scaling, one chunk per recipe: every arm with that recipe, every seed."""
    work = []
    for inputs in section.inputs:
        by_recipe: dict[Recipe, list[Arm]] = {}
        for arm in arms(section, train.lr):
            by_recipe.setdefault(arm.recipe, []).append(arm)
        for recipe, group in by_recipe.items():
            inits = tuple(arm.init for arm in group for _ in section.seeds)
            seeds = tuple(seed for _ in group for seed in section.seeds)
            chunk = Chunk(recipe, inputs, inits, seeds, section.epochs, train.batch_size, train.hidden[0],
                          section.precision)  # fmt: skip
            work.append((chunk, group))
    return work


def run(section, train, shared: dict, loss_gate: float) -> tuple[dict, list[dict]]:
    """Train every arm through the executor; the summary per input, point and intervention, and every model's run."""
    settings = section.executor_settings()
    work = chunks(section, train)
    done = lambda index, result: print(f"chunk {index + 1}/{len(work)} done", flush=True)  # noqa: E731
    results = run_chunks(train_chunk, [chunk for chunk, _ in work], shared, settings, on_result=done)
    histories, runs = {}, []
    for (chunk, group), result in zip(work, results):
        for index, arm in enumerate(group):
            own = result.value[index * len(section.seeds) : (index + 1) * len(section.seeds)]
            histories[(chunk.inputs, arm)] = own
            for seed, history in zip(section.seeds, own):
                params = {"inputs": chunk.inputs, "point": arm.point, "intervention": arm.name, "seed": seed,
                          "w1_std": arm.init[0], "w2_std": arm.init[1], **vars(arm.recipe)}  # fmt: skip
                name = f"interventions {chunk.inputs} {arm.point} {arm.name} seed {seed}"
                runs.append({"name": name, "params": params, "history": history, "node": result.node})
    summary = {
        "inputs": {inputs: summarize(section, train.lr, histories, inputs, loss_gate) for inputs in section.inputs},
        "seeds": list(section.seeds),
        "epochs": section.epochs,
        "lr": train.lr,
        "temperature": section.temperature,
        "loss_gate": f"train loss < {loss_gate}",
        "precision": section.precision,
        "executor": section.executor,
        "mlflow_experiment": section.experiment,
    }
    return summary, runs


def summarize(section, lr: float, histories: dict, inputs: str, loss_gate: float) -> list[dict]:
    """One input scaling: per point, each intervention's recipe, last-epoch figures, gate effect, curve, twin gap."""
    points = []
    for w1, w2 in section.points:
        own = [arm for arm in arms(section, lr) if arm.point == label(w1, w2)]
        named = {arm.name: histories[(inputs, arm)] for arm in own}
        baseline = seed_summary(named["baseline"], loss_gate)
        entries = []
        for arm in own:
            figures = seed_summary(named[arm.name], loss_gate)
            entry = {"name": arm.name, "init": list(arm.init), **_recipe(arm.recipe), "last_epoch": figures}
            entry["gate_effect"] = f"{_verdict(baseline)} -> {_verdict(figures)}"
            entry["curve"] = _curve(named[arm.name])
            if arm.twin_of:
                entry["twin"] = {"of": arm.twin_of, **_gap(named[arm.name], named[arm.twin_of])}
            entries.append(entry)
        points.append({"point": label(w1, w2), "w1_std": w1, "w2_std": w2, "interventions": entries})
    return points


def _recipe(recipe: Recipe) -> dict:
    return {"optimizer": recipe.optimizer, "lr": recipe.lr, "b2_lr": recipe.lr * recipe.b2_lr_factor,
            "logit_scale": recipe.logit_scale, "weight_decay": recipe.weight_decay}  # fmt: skip


def _verdict(figures: dict) -> str:
    """passes (every seed), fails (none) or mixed, with the fraction."""
    fraction = figures["gate_pass_fraction"]
    word = "passes" if fraction == 1 else "fails" if fraction == 0 else "mixed"
    return f"{word} ({fraction:.0%})"


def _curve(histories: list[list[dict]]) -> list[dict]:
    """Per epoch, train loss and validation accuracy: mean and std over seeds."""
    curve = []
    for records in zip(*histories):
        point = {"epoch": records[0]["epoch"]}
        for name in ("train_loss", "validation_accuracy"):
            point[f"{name}_mean"], point[f"{name}_std"] = mean_and_std([record[name] for record in records])
        curve.append(point)
    return curve


def _gap(histories: list[list[dict]], twins: list[list[dict]]) -> dict:
    """How far a twin pair ended apart: the largest gap over seeds and epochs, train loss relative, accuracy."""
    pairs = [(a, b) for run, twin in zip(histories, twins) for a, b in zip(run, twin)]
    finite = [(a, b) for a, b in pairs if a["train_loss"] is not None and b["train_loss"] is not None]
    if not finite:
        return {"max_train_loss_relative_gap": None, "max_validation_accuracy_gap": None, "finite_pairs": 0}
    loss_gap = max(abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"]) for a, b in finite)
    accuracy_gap = max(abs(a["validation_accuracy"] - b["validation_accuracy"]) for a, b in finite)
    return {"max_train_loss_relative_gap": loss_gap, "max_validation_accuracy_gap": accuracy_gap,
            "finite_pairs": len(finite), "pairs": len(pairs)}  # fmt: skip


def markdown(summary: dict) -> str:
    """Per input scaling and point: each intervention's gate effect and last-epoch figures (mean ± std)."""
    lines = ["# Interventions at N(0, 1) and the mixed point", ""]
    lines += [
        f"Seeds {summary['seeds']}, {summary['epochs']} epochs, train's lr {summary['lr']}, {summary['precision']}; "
        f"gate: {summary['loss_gate']} after the last epoch. Twin gap: the largest relative train-loss gap to the "
        "run it should follow, over seeds and epochs.",
        "",
    ]
    header = "| intervention | gate (baseline -> this) | train loss | validation accuracy | W1 travel | twin gap |"
    for inputs, points in summary["inputs"].items():
        for point in points:
            lines += [f"## {point['point']}, {inputs} inputs", "", header, "|---|---|---|---|---|---|"]
            for entry in point["interventions"]:
                figures, twin = entry["last_epoch"], entry.get("twin")
                gap = (
                    "-"
                    if not twin or twin["max_train_loss_relative_gap"] is None
                    else f"{twin['max_train_loss_relative_gap']:.1e}"
                )
                cells = [entry["name"], entry["gate_effect"], _pm(figures, "train_loss"),
                         _pm(figures, "validation_accuracy"), _pm(figures, "w1_travel"), gap]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def _pm(figures: dict, name: str) -> str:
    mean, std = figures[f"{name}_mean"], figures[f"{name}_std"]
    return "diverged" if mean is None else f"{mean:.4g} ± {std:.2g}"


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.pt and validation.pt")
    parser.add_argument("--stats", type=Path, required=True, help="prepare's JSON (normalize, mean, std)")
    parser.add_argument("--report", type=Path, required=True, help="JSON: per input, point and intervention")
    parser.add_argument("--table", type=Path, required=True, help="Markdown: the same as tables")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    section = params.interventions
    if section is None:
        raise PipelineError(f"interventions: {args.params} has no interventions section")
    shared = load_shared(args.data, args.stats)
    with cpu.shared_threads():
        summary, runs = run(section, params.train, shared, params.evaluate.max_train_loss)
    table = markdown(summary)
    stage_params = {"points": [list(p) for p in section.points], "seeds": list(section.seeds),
                    "executor": section.executor}  # fmt: skip
    log_model_runs("interventions", section.experiment, stage_params, runs, summary, [])
    write_text(args.table, table)
    write_json(args.report, summary)


if __name__ == "__main__":
    main()
