"""Stage `init_scale`: why N(0, 0.01) trains and N(0, 1) does not, measured across init scales.

d2l's MLP (train's hidden width, lr, batch size and device; the study's own precision) starts from each point of
params.yaml's `init_scale`: W1 and W2 ~ N(0, std^2) on a log grid, mixed pairs (W1 scaled, W2 not), and
nn.Linear's own default init. Every point and seed trains as one batched computation (pipeline/batched.py),
each model with its own init and shuffling, for init_scale.epochs; the figures at each report epoch come from
those same runs, since a constant learning rate makes a shorter run the prefix of a longer one. At init and
after each epoch it measures, per model, on a fixed probe of train images: the loss, the spread of the logits,
the fraction of images whose top softmax probability exceeds 0.99 (saturated), the fraction of hidden ReLUs
that are zero on every probe image (dead), and each layer's gradient and weight norms; plus the epoch's train
loss and the validation accuracy. One MLflow run per point and seed (experiment init_scale.experiment),
logged with step = epoch; reports/init_scale.json and its figure hold the means and spreads over seeds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import batched, cli, config, cpu, tracking
from pipeline import model as mlp
from pipeline.cli import stage_entry
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.executor import run_chunks
from pipeline.files import pyplot, write_json, write_png, write_text
from pipeline.interventions import Point, conserved, init_points, travel
from pipeline.spread import mean_and_std as spread_of
from pipeline.tensors import load_split

DIAGNOSTICS = (
    "loss",
    "logit_std",
    "probe_gradient_logit_step",
    "saturated_fraction",
    "dead_relu_fraction",
    "grad_norm_w1",
    "grad_norm_w2",
    "weight_norm_w1",
    "weight_norm_w2",
    "conserved_mean",
    "conserved_drift_mean",
    "conserved_drift_max",
    "w1_travel",
    "sharpness",
)
TRACE = ("flips", "dead_relu_fraction", "minibatch_logit_step", "logit_std")  # epoch 1, every trace_every steps
SATURATED = 0.99  # top softmax probability above this: the image's gradient has all but vanished


def points(study: config.InitScaleParams) -> list[Point]:
    """The grid, then the mixed pairs, then PyTorch's default, in params.yaml's order."""
    return init_points(study.stds, study.mixed, study.pytorch_default)


def diagnose(models: batched.Stack, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """Each model's figures on one batch of images (fp32, one hidden layer), by autograd: name -> [M].
    probe_gradient_logit_step is how far one full-batch gradient step at `lr` on the whole probe's mean loss
    would move the probe's logits (root mean square); it is not a training step, which is on a minibatch (the
    trace's minibatch_logit_step is)."""
    parameters = [tensor.detach().clone().requires_grad_() for tensor in models.parameters()]
    layers = len(models.weights)
    probe = batched.Stack(parameters[:layers], parameters[layers:], models.activation)
    inputs = images.expand(models.models, *images.shape)
    logits = batched.forward(probe, inputs)
    losses = batched.example_losses(logits, labels.expand(models.models, -1)).mean(1)
    gradients = torch.autograd.grad(losses.sum(), parameters)
    with torch.no_grad():
        stepped = [parameter - lr * gradient for parameter, gradient in zip(parameters, gradients)]
        moved = batched.forward(batched.Stack(stepped[:layers], stepped[layers:], models.activation), inputs) - logits
        hidden = torch.baddbmm(probe.biases[0].unsqueeze(1), inputs, probe.weights[0])
        top = logits.softmax(-1).amax(-1)
        return {
            "loss": losses.detach(),
            "logit_std": logits.flatten(1).std(1),
            "probe_gradient_logit_step": moved.flatten(1).pow(2).mean(1).sqrt(),
            "saturated_fraction": (top > SATURATED).float().mean(1),
            "dead_relu_fraction": (hidden.amax(1) <= 0).float().mean(1),
            "grad_norm_w1": gradients[0].flatten(1).norm(dim=1),
            "grad_norm_w2": gradients[1].flatten(1).norm(dim=1),
            "weight_norm_w1": probe.weights[0].detach().flatten(1).norm(dim=1),
            "weight_norm_w2": probe.weights[1].detach().flatten(1).norm(dim=1),
        }


def sharpness(models: batched.Stack, images: torch.Tensor, labels: torch.Tensor, iterations: int) -> torch.Tensor:
    """Each model's top Hessian eigenvalue (largest in magnitude) of the mean cross-entropy on the batch, by power
    iteration on Hessian-vector products (double backward); [M]. Against 2 / lr: above it, gradient descent on the
    quadratic model overshoots along that direction. The summed loss is separable by model, so one product gives
    every model's own."""
    parameters = [tensor.detach().clone().requires_grad_() for tensor in models.parameters()]
    layers = len(models.weights)
    probe = batched.Stack(parameters[:layers], parameters[layers:], models.activation)
    logits = batched.forward(probe, images.expand(models.models, *images.shape))
    loss = batched.example_losses(logits, labels.expand(models.models, -1)).mean(1).sum()
    gradients = torch.autograd.grad(loss, parameters, create_graph=True)
    vector = [torch.stack([_start(p.shape[1:], p.device) for _ in range(models.models)]) for p in parameters]
    estimate = torch.zeros(models.models, device=images.device)
    for _ in range(iterations):
        norms = sum(v.flatten(1).pow(2).sum(1) for v in vector).sqrt()
        vector = [v / norms.view(-1, *[1] * (v.dim() - 1)) for v in vector]
        products = torch.autograd.grad(gradients, parameters, vector, retain_graph=True)
        estimate = sum((v * product).flatten(1).sum(1) for v, product in zip(vector, products))
        vector = [product.detach() for product in products]
    return estimate.detach()


def _start(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Power iteration's start vector for one model's parameter: the same for every model, in any chunk."""
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0), device=device)


class Trace:
    """Epoch 1's trace, every `every` steps, on the probe: flips (the fraction of images whose prediction changed
    since the last record), dead ReLUs, the logit step of that very minibatch step (RMS change of the probe's
    logits it caused) and the logits' spread. Called after each optimizer step (batched.train_epoch's after_step)."""

    def __init__(self, models: batched.Stack, images: torch.Tensor, every: int):
        self.models, self.images, self.every = models, images.expand(models.models, *images.shape), every
        self.before = self._logits()
        self.last_predictions = self.before.argmax(-1)
        self.records: list[dict] = []

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        return batched.forward(self.models, self.images)

    @torch.no_grad()
    def __call__(self, index: int) -> None:
        after = self._record() if index % self.every == 0 else None
        if (index + 1) % self.every == 0:  # the next step is recorded: keep the logits before it
            self.before = after if after is not None else self._logits()

    @torch.no_grad()
    def _record(self) -> torch.Tensor:
        after = self._logits()
        predictions = after.argmax(-1)
        hidden = torch.baddbmm(self.models.biases[0].unsqueeze(1), self.images, self.models.weights[0])
        figures = {
            "flips": (predictions != self.last_predictions).float().mean(1),
            "dead_relu_fraction": (hidden.amax(1) <= 0).float().mean(1),
            "minibatch_logit_step": (after - self.before).flatten(1).pow(2).mean(1).sqrt(),
            "logit_std": after.flatten(1).std(1),
        }
        self.last_predictions = predictions
        self.records.append({"step": len(self.records) * self.every + 1, **{k: v.tolist() for k, v in figures.items()}})
        return after

    def per_model(self, index: int) -> list[dict]:
        return [{"step": r["step"], **{name: r[name][index] for name in TRACE}} for r in self.records]


@dataclass(frozen=True)
class StudyChunk:
    """Models trained together in one call (one executor task): (point, seed) pairs, with the settings they need."""

    models: tuple[tuple[Point, int], ...]
    study: config.InitScaleParams
    train: config.TrainParams


@dataclass(frozen=True)
class Trained:
    """Every model of the grid, in points-then-seeds order: its history and the executor node that trained it."""

    models: list[tuple[Point, int]]
    histories: list[list[dict]]
    nodes: list[str]


def chunks(study: config.InitScaleParams, train_params: config.TrainParams) -> list[StudyChunk]:
    """The grid's (point, seed) models, in order, cut into chunks of init_scale.chunk_models."""
    models, size = models_of(study), study.chunk_models
    return [StudyChunk(tuple(models[i : i + size]), study, train_params) for i in range(0, len(models), size)]


def train(
    study: config.InitScaleParams, train_params: config.TrainParams, data: dict, report=lambda models, records: None
) -> Trained:
    """Every (point, seed), chunk by chunk through the study's executor (here, or as Ray tasks); `report(models,
    last records)` as each chunk ends. A model's figures do not depend on which chunk it trains in."""
    work = chunks(study, train_params)

    def done(index: int, result) -> None:
        print(f"chunk {index + 1}/{len(work)} done", flush=True)
        report(list(work[index].models), [history[-1] for history in result.value])

    results = run_chunks(train_chunk, work, data, study.executor_settings(), on_result=done)
    return Trained(
        [model for chunk in work for model in chunk.models],
        [history for result in results for history in result.value],
        [result.node for chunk, result in zip(work, results) for _ in chunk.models],
    )


def train_chunk(chunk: StudyChunk, data: dict) -> list[list[dict]]:
    """One chunk's models trained together; per model, one record per epoch (epoch 0 is at init)."""
    study, train_params, models = chunk.study, chunk.train, list(chunk.models)
    device = resolve_device(train_params.device)
    nets = [initial_net(point, seed, train_params.hidden, device) for point, seed in models]
    group = batched.stack(nets, device)
    step = batched.optimizer("sgd", group, train_params.lr)
    (train_images, train_labels), validation = (
        (x.to(device), y.to(device)) for x, y in (data["train"], data["validation"])
    )
    probe = tuple(tensor[: study.probe] for tensor in (train_images, train_labels))
    shuffles = [torch.Generator(device=device).manual_seed(seed) for _, seed in models]
    histories: list[list[dict]] = [[] for _ in models]
    full_loss = batched.evaluate(group, train_images, train_labels).loss  # epoch 0: the train loss at init
    initial = (group.weights[0].detach().clone(), conserved(group).detach())
    measure = lambda epoch: _measure(group, probe, validation, train_params.lr, initial, study, epoch)  # noqa: E731
    _record(histories, 0, full_loss.tolist(), *measure(0), 0.0)
    for epoch in range(1, study.epochs + 1):
        started = time.perf_counter()
        trace = Trace(group, probe[0], study.trace_every) if epoch == 1 else None
        step_losses, _ = batched.train_epoch(
            group, step, train_images, train_labels, train_params.batch_size, shuffles, "cross_entropy",
            study.precision, after_step=trace,
        )  # fmt: skip
        train_loss = (step_losses.sum(1) / len(train_labels)).tolist()
        _record(histories, epoch, train_loss, *measure(epoch), time.perf_counter() - started)
        if trace is not None:
            for index, history in enumerate(histories):
                history[-1]["epoch_1_trace"] = trace.per_model(index) if history[-1]["train_loss"] is not None else []
    return histories


def initial_net(point: Point, seed: int, hidden: tuple[int, ...], device: torch.device) -> torch.nn.Module:
    """d2l's nn.Sequential MLP at the point's init, drawn like train's: at std 0.01 it is the d2l variant's start."""
    generator = torch.Generator().manual_seed(seed)
    return mlp.build("module", hidden, "relu", (point.w1_std, point.w2_std), generator).to(device)


def _measure(group: batched.Stack, probe: tuple, validation: tuple, lr: float, initial: tuple, study, epoch: int):
    """The probe's diagnostics (sharpness only at init_scale.sharpness_epochs) and every model's validation
    accuracy, as lists."""
    figures = {**diagnose(group, *probe, lr), **travel(group, *initial)}
    figures["sharpness"] = (
        sharpness(group, *probe, study.sharpness_iterations)
        if epoch in study.sharpness_epochs
        else [None] * group.models
    )
    figures = {name: values if isinstance(values, list) else values.tolist() for name, values in figures.items()}
    accuracy = batched.evaluate(group, *validation).accuracy.tolist() if len(validation[1]) else [None] * group.models
    return figures, accuracy


def _record(histories, epoch: int, train_loss: list[float], figures: dict, accuracy: list, seconds: float) -> None:
    """Append each model's epoch: train loss, validation accuracy, and the probe's diagnostics (null if diverged)."""
    for index, history in enumerate(histories):
        diverged = bool(history and history[-1]["train_loss"] is None) or not math.isfinite(train_loss[index])
        record = {"epoch": epoch, "train_loss": train_loss[index], "validation_accuracy": accuracy[index]}
        record.update({name: values[index] for name, values in figures.items()})
        if diverged:  # a seed that went non-finite keeps null figures from then on
            record = {key: (epoch if key == "epoch" else None) for key in record}
        history.append({**record, "seconds": seconds})


def summarize(study: config.InitScaleParams, models, histories, loss_gate: float) -> list[dict]:
    """init_scale.json's points: per report epoch and at init, means and spreads over the point's seeds."""
    summary = []
    for point in points(study):
        runs = [history for (other, _), history in zip(models, histories) if other == point]
        epochs = {str(epoch): _epoch_summary([run[epoch] for run in runs], loss_gate) for epoch in study.report_epochs}
        at_init = {name: finite_mean_and_std([run[0][name] for run in runs])[0] for name in DIAGNOSTICS}
        summary.append(
            {
                "label": point.label,
                "w1_std": point.w1_std,
                "w2_std": point.w2_std,
                "seeds": list(study.seeds),
                "epochs": epochs,
                "at_init": at_init,
                "sharpness": {
                    str(epoch): dict(
                        zip(("mean", "std"), finite_mean_and_std([run[epoch]["sharpness"] for run in runs]))
                    )
                    for epoch in study.sharpness_epochs
                    if epoch <= study.epochs
                },
                "epoch_1_trace": _trace_summary([run[1].get("epoch_1_trace", []) for run in runs]),
                "curve": [_curve_point([run[epoch] for run in runs]) for epoch in range(len(runs[0]))],
            }
        )
    return summary


def _trace_summary(traces: list[list[dict]]) -> list[dict]:
    """Epoch 1's trace of a point: per recorded step, each figure's mean and std over the seeds that stayed finite."""
    finite = [trace for trace in traces if trace]
    summary = []
    for records in zip(*finite):
        entry = {"step": records[0]["step"]}
        for name in TRACE:
            entry[f"{name}_mean"], entry[f"{name}_std"] = finite_mean_and_std([record[name] for record in records])
        summary.append(entry)
    return summary


def _curve_point(records: list[dict]) -> dict:
    """One epoch of a point's curve: train loss and validation accuracy, mean and std over seeds."""
    figures = {"epoch": records[0]["epoch"]}
    for name in ("train_loss", "validation_accuracy"):
        figures[f"{name}_mean"], figures[f"{name}_std"] = finite_mean_and_std([record[name] for record in records])
    return figures


def _epoch_summary(records: list[dict], loss_gate: float) -> dict:
    """Mean and std over seeds (n: the finite ones) of every figure, and the fraction passing the loss gate."""
    figures = {"finite_seeds": sum(record["train_loss"] is not None for record in records)}
    for name in ("train_loss", "validation_accuracy", *DIAGNOSTICS[1:]):
        figures[f"{name}_mean"], figures[f"{name}_std"] = finite_mean_and_std([record[name] for record in records])
    passing = [record["train_loss"] is not None and record["train_loss"] < loss_gate for record in records]
    figures["loss_gate_pass_fraction"] = sum(passing) / len(records)
    return figures


def finite_mean_and_std(values: list) -> tuple[float | None, float | None]:
    """Mean and std over seeds of the finite values: a diagnostic that overflowed for one seed (a huge init's
    sharpness, say) is left out like a diverged seed's, never averaged into the others."""
    return spread_of([value for value in values if value is not None and math.isfinite(value)])


def _x(point: dict) -> float:
    """Where a point sits on the init-std axis: its W1 std; PyTorch's default at its W1 std, 1/sqrt(3 * 784)."""
    return point["w1_std"] if point["w1_std"] is not None else 1 / math.sqrt(3 * mlp.INPUTS)


def draw(path: Path, summary: list[dict], report_epochs: tuple[int, ...]) -> None:
    """Loss and accuracy against init std at each report epoch (seed bands), the diagnostics at init, the curves."""
    plt = pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    grid = [point for point in summary if point["w1_std"] is not None and point["w1_std"] == point["w2_std"]]
    others = [point for point in summary if point not in grid]
    stds = [point["w1_std"] for point in grid]
    for panel, name, title in (
        (axes[0, 0], "train_loss", "train loss"),
        (axes[0, 1], "validation_accuracy", "validation accuracy"),
    ):
        for epoch in report_epochs:
            means = [point["epochs"][str(epoch)][f"{name}_mean"] for point in grid]
            spreads = [point["epochs"][str(epoch)][f"{name}_std"] for point in grid]
            (line,) = panel.plot(stds, means, marker="o", label=f"epoch {epoch}")
            panel.fill_between(
                stds, _shift(means, spreads, -1), _shift(means, spreads, 1), color=line.get_color(), alpha=0.2
            )
            for marker, point in zip("s^Dv", others):
                figures = point["epochs"][str(epoch)]
                panel.errorbar(
                    _x(point),
                    figures[f"{name}_mean"],
                    yerr=figures[f"{name}_std"] or 0,
                    marker=marker,
                    color=line.get_color(),
                    linestyle="none",
                    label=f"{point['label']}, epoch {epoch}",
                )
        panel.set(xscale="log", xlabel="init std (W1 and W2)", ylabel=title, title=f"{title} (mean ± std over seeds)")
    axes[0, 0].set_yscale("log")
    _at_init(axes[0, 2], grid, ("logit_std", "loss"), "log", "at init: logit std and loss")
    _at_init(
        axes[1, 0],
        grid,
        ("saturated_fraction", "dead_relu_fraction"),
        "linear",
        "at init: saturated images, dead ReLUs",
    )
    _at_init(axes[1, 1], grid, ("grad_norm_w1", "grad_norm_w2"), "log", "at init: gradient norms")
    for point in summary:
        curve = [entry for entry in point["curve"] if entry["train_loss_mean"] is not None]
        axes[1, 2].plot(
            [entry["epoch"] for entry in curve], [entry["train_loss_mean"] for entry in curve], label=point["label"]
        )
    axes[1, 2].set(yscale="log", xlabel="epoch", ylabel="train loss", title="train loss by epoch (mean over seeds)")
    for panel in axes.flat:
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7)
    figure.tight_layout()
    write_png(path, figure)


def _shift(means: list, spreads: list, sign: int) -> list:
    return [None if mean is None else mean + sign * (spread or 0) for mean, spread in zip(means, spreads)]


def _at_init(panel, grid: list[dict], names: tuple[str, ...], scale: str, title: str) -> None:
    for name in names:
        panel.plot(
            [point["w1_std"] for point in grid], [point["at_init"][name] for point in grid], marker="o", label=name
        )
    panel.set(xscale="log", yscale=scale, xlabel="init std (W1 and W2)", title=title)


def markdown(summary: dict) -> str:
    """The study as a table: per point, the state at init and the figures at each report epoch (mean ± std)."""
    epochs = sorted(int(epoch) for epoch in summary["points"][0]["epochs"])
    header = ["point", "loss at init", "logit std", "saturated", "probe-gradient step"]
    header += [f"{what} @{epoch}" for epoch in epochs for what in ("train loss", "val acc", "loss gate", "dead ReLUs")]
    lines = [
        "# Init scale: d2l's MLP from each init",
        "",
        f"Mean (± std) over seeds {summary['points'][0]['seeds']}; at init on {summary['probe_images']} train images: "
        "the logits' std, the fraction of images whose top softmax probability exceeds 0.99 (saturated), and how "
        f"far one full-batch gradient step at lr {summary['lr']} on the whole probe would move its logits (root mean "
        "square; not a training step, which is on a minibatch). Loss gate: the "
        f"fraction of seeds with {summary['loss_gate']}. Precision {summary['precision']}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for point in summary["points"]:
        start = point["at_init"]
        cells = [point["label"], _g(start["loss"]), _g(start["logit_std"]), f"{start['saturated_fraction']:.1%}"]
        cells.append(_g(start["probe_gradient_logit_step"]))
        for epoch in epochs:
            figures = point["epochs"][str(epoch)]
            cells += [_pm(figures, "train_loss"), _pm(figures, "validation_accuracy")]
            cells += [f"{figures['loss_gate_pass_fraction']:.0%}", f"{figures['dead_relu_fraction_mean']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _pm(figures: dict, name: str) -> str:
    mean, std = figures[f"{name}_mean"], figures[f"{name}_std"]
    return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"


def run_name(point: Point, seed: int) -> str:
    return f"init_scale {point.label} seed {seed}"


def run_params(point: Point, seed: int, study: config.InitScaleParams) -> dict:
    """What the MLflow UI compares the runs by (the shared settings are on the stage's run): init std (one number
    where W1 and W2 share it), epochs, seed."""
    shared = point.w1_std if point.w1_std == point.w2_std else None
    return {
        "label": point.label,
        "w1_std": "default" if point.w1_std is None else point.w1_std,
        "w2_std": "default" if point.w2_std is None else point.w2_std,
        "init_std": "default" if point.w1_std is None else (shared if shared is not None else "mixed"),
        "seed": seed,
        "epochs": study.epochs,
    }


def print_epoch(models: list[tuple[Point, int]], records: list[dict]) -> None:
    """One line per point of `models` (a chunk's): its train loss and validation accuracy, mean over seeds."""
    for point in dict.fromkeys(point for point, _ in models):
        own = [record for (other, _), record in zip(models, records) if other == point]
        loss, _ = finite_mean_and_std([record["train_loss"] for record in own])
        accuracy, _ = finite_mean_and_std([record["validation_accuracy"] for record in own])
        print(
            f"epoch {own[0]['epoch']:3d}  {point.label:<20}  train loss {_fmt(loss)}  validation acc {_fmt(accuracy)}",
            flush=True,
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@stage_entry
def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="directory with train.pt and validation.pt")
    parser.add_argument("--report", type=Path, required=True, help="JSON: per point, figures at each report epoch")
    parser.add_argument("--plot", type=Path, required=True, help="PNG: the figures against init std")
    parser.add_argument("--table", type=Path, required=True, help="Markdown: the figures per point")
    args = parser.parse_args()
    params = config.load(args.params)
    tracking.check_reachable()  # before any work: the runs are logged once the figures exist
    data = {split: load_split(args.data / f"{split}.pt") for split in ("train", "validation")}
    study, train_params = params.init_scale, params.train
    if study is None:
        raise PipelineError(f"init_scale: {args.params} has no init_scale section; expected the study's points")
    with cpu.shared_threads():
        trained = train(study, train_params, data, print_epoch)
    models, histories = trained.models, trained.histories
    summary = {
        "points": summarize(study, models, histories, params.evaluate.max_train_loss),
        "loss_gate": f"train loss < {params.evaluate.max_train_loss}",
        "probe_images": min(study.probe, len(data["train"][1])),
        "lr": train_params.lr,
        "batch_size": train_params.batch_size,
        "hidden": list(train_params.hidden),
        "epochs": study.epochs,
        "precision": study.precision,
        "two_over_lr": 2 / train_params.lr,
        "sharpness_iterations": study.sharpness_iterations,
        "trace_every": study.trace_every,
        "device": resolve_device(train_params.device).type,
        "executor": study.executor,
        "mlflow_experiment": study.experiment,
    }
    table = markdown(summary)
    draw(args.plot, summary["points"], study.report_epochs)
    log_runs(study, train_params, trained, summary, table, args.plot)
    write_text(args.table, table)
    write_json(args.report, summary)


def models_of(study: config.InitScaleParams) -> list[tuple[Point, int]]:
    return [(point, seed) for point in points(study) for seed in study.seeds]


def log_runs(study, train_params, trained: Trained, summary: dict, table: str, plot: Path) -> None:
    """The study's run and one nested run per point and seed (epochs with step=epoch, the node that trained it as a
    tag: node ids change every run, so they stay out of the committed JSON), in one short step."""
    import mlflow
    from mlflow.entities import Metric, Param

    with tracking.logged_run("init_scale", study.experiment) as parent:
        mlflow.log_params(
            {
                "points": len(points(study)),
                "seeds": list(study.seeds),
                "epochs": study.epochs,
                "lr": train_params.lr,
                "batch_size": train_params.batch_size,
                "hidden": list(train_params.hidden),
                "precision": study.precision,
                "executor": study.executor,
                "chunk_models": study.chunk_models,
            }
        )
        mlflow.log_metric("train_seconds", sum(record["seconds"] for record in trained.histories[0]))
        client, now = mlflow.MlflowClient(), int(time.time() * 1000)
        tags = {**tracking.lineage_tags("init_scale"), "mlflow.parentRunId": parent.info.run_id}
        for (point, seed), history, node in zip(trained.models, trained.histories, trained.nodes):
            run_tags = {**tags, "ray_node": node}
            run = client.create_run(parent.info.experiment_id, run_name=run_name(point, seed), tags=run_tags)
            metrics = [
                Metric(key, value, now, record["epoch"])
                for record in history
                for key, value in record.items()
                if key not in ("epoch", "seconds", "epoch_1_trace") and value is not None
            ]
            metrics += [
                Metric(f"epoch_1_{name}", entry[name], now, entry["step"])
                for entry in history[1].get("epoch_1_trace") or []
                for name in TRACE
            ]
            metrics += [
                Metric(f"{key}_at_{epoch}", history[epoch][key], now, 0)
                for epoch in study.report_epochs
                for key in ("train_loss", "validation_accuracy")
                if history[epoch][key] is not None
            ]
            figures = {**run_params(point, seed, study), "precision": study.precision}
            client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in figures.items()])
            client.set_terminated(run.info.run_id, "FINISHED")
        mlflow.log_artifact(str(plot))
        mlflow.log_dict(summary, "init_scale.json")
        mlflow.log_text(table, "init_scale.md")


if __name__ == "__main__":
    main()
