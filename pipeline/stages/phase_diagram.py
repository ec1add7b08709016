"""Stage `phase_diagram`: where d2l's MLP trains in 10 epochs, over learning rate x init point, on both inputs.

Every cell is a constant learning rate (phase_diagram.lrs) and one of init_scale's init points (its stds, mixed
pairs and PyTorch's default), trained with SGD for phase_diagram.epochs from each seed, on standardized inputs
and on d2l's own [0, 1] pixels (both derived from the one prepared dataset, pipeline/interventions.py). A chunk
is one input scaling and learning rate with all its points and seeds, trained together through the batched
trainer; the chunks run here or as Ray tasks (pipeline/executor.py), and this process logs every model's MLflow
run (with the Ray node that trained it) and writes the outputs. The figures: per input scaling, heatmaps of the
fraction of seeds passing the 10-epoch gate (train loss < evaluate.max_train_loss) and of validation accuracy.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import cli, config, cpu, tracking
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.executor import run_chunks
from pipeline.files import pyplot, write_json, write_png, write_text
from pipeline.interventions import (
    Chunk,
    Point,
    Recipe,
    init_points,
    load_shared,
    log_model_runs,
    seed_summary,
    train_chunk,
)


def grid(study: config.InitScaleParams) -> list[Point]:
    """init_scale's init points: its stds, its mixed pairs, PyTorch's default."""
    return init_points(study.stds, study.mixed, study.pytorch_default)


def chunks(section: config.PhaseDiagramParams, study, train: config.TrainParams) -> list[Chunk]:
    """One chunk per input scaling and learning rate: every point and seed of that cell row."""
    points = grid(study)
    inits = tuple((point.w1_std, point.w2_std) for point in points for _ in section.seeds)
    seeds = tuple(seed for _ in points for seed in section.seeds)
    return [
        Chunk(Recipe(lr=lr), inputs, inits, seeds, section.epochs, train.batch_size, train.hidden[0], section.precision)
        for inputs in section.inputs
        for lr in section.lrs
    ]


def run(section, study, train, shared: dict, loss_gate: float) -> tuple[dict, list[dict]]:
    """Train the grid through the executor; the summary (per input, per point and lr) and every model's run."""
    settings = section.executor_settings()
    work = chunks(section, study, train)
    done = lambda index, result: print(f"chunk {index + 1}/{len(work)} done", flush=True)  # noqa: E731
    results = run_chunks(train_chunk, work, shared, settings, on_result=done)
    points, runs, cells = grid(study), [], {inputs: [] for inputs in section.inputs}
    for chunk, result in zip(work, results):
        for index, point in enumerate(points):
            own = slice(index * len(section.seeds), (index + 1) * len(section.seeds))
            histories = result.value[own]
            cell = {"point": point.label, "w1_std": point.w1_std, "w2_std": point.w2_std, "lr": chunk.recipe.lr}
            cells[chunk.inputs].append({**cell, **seed_summary(histories, loss_gate)})
            for seed, history in zip(section.seeds, histories):
                name = f"phase_diagram {chunk.inputs} lr {chunk.recipe.lr:g} {point.label} seed {seed}"
                params = {**cell, "inputs": chunk.inputs, "seed": seed, "epochs": section.epochs}
                runs.append({"name": name, "params": params, "history": history, "node": result.node})
    summary = {
        "inputs": {inputs: {"cells": found, "answer": answer(found)} for inputs, found in cells.items()},
        "points": [point.label for point in points],
        "lrs": list(section.lrs),
        "seeds": list(section.seeds),
        "epochs": section.epochs,
        "loss_gate": f"train loss < {loss_gate}",
        "precision": section.precision,
        "executor": section.executor,
        "batch_size": train.batch_size,
        "hidden": list(train.hidden),
        "mlflow_experiment": section.experiment,
    }
    return summary, runs


def answer(cells: list[dict]) -> dict:
    """Does any constant learning rate make N(0, 1) pass the gate: the lrs where every seed, and where any, pass."""
    unit = [cell for cell in cells if cell["point"] == "std 1"]
    return {
        "std_1_all_seeds_pass_lrs": [cell["lr"] for cell in unit if cell["gate_pass_fraction"] == 1],
        "std_1_any_seed_passes_lrs": [cell["lr"] for cell in unit if cell["gate_pass_fraction"] > 0],
        "std_1_lowest_train_loss": min(
            (cell["train_loss_mean"] for cell in unit if cell["train_loss_mean"]), default=None
        ),
    }


def matrix(summary: dict, inputs: str, name: str) -> list[list[float | None]]:
    """One figure as rows = points, columns = learning rates."""
    found = {(cell["point"], cell["lr"]): cell[name] for cell in summary["inputs"][inputs]["cells"]}
    return [[found[(point, lr)] for lr in summary["lrs"]] for point in summary["points"]]


def draw(path: Path, summary: dict) -> None:
    """Per input scaling (rows), heatmaps of the gate pass fraction and of validation accuracy (columns)."""
    plt = pyplot()
    inputs = list(summary["inputs"])
    figure, axes = plt.subplots(len(inputs), 2, figsize=(12, 4.5 * len(inputs)), squeeze=False)
    for row, name in enumerate(inputs):
        for column, (figure_name, title) in enumerate(
            (("gate_pass_fraction", "10-epoch gate pass fraction"), ("validation_accuracy_mean", "validation accuracy"))
        ):
            values = [[float("nan") if v is None else v for v in line] for line in matrix(summary, name, figure_name)]
            panel = axes[row, column]
            image = panel.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (y, x), value in _cells(values):
                panel.text(x, y, "-" if value != value else f"{value:.2f}", ha="center", va="center", fontsize=7)
            panel.set(xticks=range(len(summary["lrs"])), yticks=range(len(summary["points"])))
            panel.set_xticklabels([f"{lr:g}" for lr in summary["lrs"]])
            panel.set_yticklabels(summary["points"], fontsize=7)
            panel.set(xlabel="learning rate", title=f"{title}, {name} inputs ({summary['precision']})")
            figure.colorbar(image, ax=panel)
    figure.tight_layout()
    write_png(path, figure)


def _cells(values: list[list[float]]):
    return [((y, x), value) for y, line in enumerate(values) for x, value in enumerate(line)]


def markdown(summary: dict) -> str:
    """Per input scaling, the gate pass fraction and validation accuracy (mean ± std over seeds) per point and lr."""
    lines = ["# Phase diagram: learning rate x init point, 10-epoch gate", ""]
    lines += [
        f"Seeds {summary['seeds']}, {summary['epochs']} epochs of SGD, {summary['precision']}; gate: "
        f"{summary['loss_gate']}. Cell: fraction of seeds passing; validation accuracy mean ± std over seeds.",
        "",
    ]
    header = "| point | " + " | ".join(f"lr {lr:g}" for lr in summary["lrs"]) + " |"
    for inputs, found in summary["inputs"].items():
        lines += [f"## {inputs} inputs", "", header, "|" + "---|" * (len(summary["lrs"]) + 1)]
        cells = {(cell["point"], cell["lr"]): cell for cell in found["cells"]}
        for point in summary["points"]:
            row = [_cell(cells[(point, lr)]) for lr in summary["lrs"]]
            lines.append(f"| {point} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(cell: dict) -> str:
    if cell["validation_accuracy_mean"] is None:
        return f"{cell['gate_pass_fraction']:.0%} (diverged)"
    accuracy = f"{cell['validation_accuracy_mean']:.3f} ± {cell['validation_accuracy_std']:.3f}"
    return f"{cell['gate_pass_fraction']:.0%}, {accuracy}"


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.pt and validation.pt")
    parser.add_argument("--stats", type=Path, required=True, help="prepare's JSON (normalize, mean, std)")
    parser.add_argument("--report", type=Path, required=True, help="JSON: per input, point and lr, the figures")
    parser.add_argument("--plot", type=Path, required=True, help="PNG: the heatmaps")
    parser.add_argument("--table", type=Path, required=True, help="Markdown: the figures per point and lr")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    section, study = params.phase_diagram, params.init_scale
    if section is None or study is None:
        raise PipelineError(f"phase_diagram: {args.params} needs phase_diagram and init_scale sections")
    shared = load_shared(args.data, args.stats)
    with cpu.shared_threads():
        summary, runs = run(section, study, params.train, shared, params.evaluate.max_train_loss)
    table = markdown(summary)
    draw(args.plot, summary)
    stage_params = {"lrs": list(section.lrs), "seeds": list(section.seeds), "executor": section.executor}
    log_model_runs("phase_diagram", section.experiment, stage_params, runs, summary, [args.plot])
    write_text(args.table, table)
    write_json(args.report, summary)


if __name__ == "__main__":
    main()
