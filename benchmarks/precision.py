"""Benchmark: batched bf16 training against fp32, validation accuracy paired by seed (issue 23, item 3).

`python -m benchmarks.precision [--seeds 10] [--device auto|cpu|cuda]` trains one model per seed of a variant
(d2l's by default: 784-256-10, lr 0.1, batch 256, 10 epochs) as one batched computation, once in fp32 and
once in bf16, from the same inits and in the same orders, on the prepared data (train minus the held-out
validation images), and compares validation accuracy after the last epoch, paired by seed, by two one-sided
tests: equivalent when the 90% t interval of the differences (bf16 - fp32) lies inside +-MARGIN. Prints a
table and one JSON line, and keeps the JSON in benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench import device_description, write_result
from pipeline import batched, config, stats, tensors
from pipeline import model as mlp
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.stages import train

MARGIN = 0.005  # accuracy: compare.margin in params.yaml, the margin every comparison of the pipeline uses
CONFIDENCE = 0.90  # two one-sided tests at 5% each
RESULTS = Path(__file__).parent / "results"
Split = tuple[torch.Tensor, torch.Tensor]


def train_together(
    params: config.TrainParams, seeds: list[int], precision: str, train_data: Split, device: torch.device
) -> tuple[batched.Stack, torch.Tensor, float]:
    """The seeds' models trained for params.epochs as one batched computation; the stack, the last epoch's
    per-step losses [M, steps] and the seconds the training took."""
    models = [
        mlp.build(params.impl, params.hidden, "relu", params.init_std, torch.Generator().manual_seed(seed))
        for seed in seeds
    ]
    stacked = batched.stack(models, device)
    step = batched.optimizer("sgd", stacked, params.lr)
    images, labels = train_data[0].to(device), train_data[1].to(device)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    started = time.perf_counter()
    for _ in range(params.epochs):
        losses, _ = batched.train_epoch(
            stacked, step, images, labels, params.batch_size, generators, precision=precision
        )
    losses = losses.cpu()  # the one sync: waits for the last epoch
    return stacked, losses, time.perf_counter() - started


def run(params: config.TrainParams, seeds: list[int], train_data: Split, validation_data: Split, device_name: str):
    """Train the seeds in fp32 and in bf16; validation accuracy per seed, the TOST result and the seconds."""
    device = train.resolve_device(device_name)
    validation = tuple(tensor.to(device) for tensor in validation_data)
    accuracy, loss, seconds, finite = {}, {}, {}, {}
    for precision in ("fp32", "bf16"):
        stacked, losses, seconds[precision] = train_together(params, seeds, precision, train_data, device)
        figures = batched.evaluate(stacked, *validation)
        losses_per_model, accuracies = figures.loss.tolist(), figures.accuracy.tolist()
        accuracy[precision] = {str(seed): value for seed, value in zip(seeds, accuracies)}
        loss[precision] = {str(seed): value for seed, value in zip(seeds, losses_per_model)}
        finite[precision] = bool(torch.isfinite(losses).all())
    comparison = stats.paired_comparison(accuracy["bf16"], accuracy["fp32"], MARGIN)
    return {
        "comparison": "bf16 - fp32, validation accuracy after the last epoch",
        "margin": MARGIN,
        "confidence": CONFIDENCE,
        **comparison,
        "validation_accuracy": accuracy,
        "validation_loss": loss,
        "finite": finite,
        "train_seconds": {name: round(value, 3) for name, value in seconds.items()},
        "epochs": params.epochs,
        "settings": {
            "hidden": list(params.hidden),
            "lr": params.lr,
            "batch_size": params.batch_size,
            "init_std": params.init_std,
            "train_count": len(train_data[1]),
            "validation_count": len(validation_data[1]),
        },  # fmt: skip
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def table(result: dict) -> str:
    lines = [f"{'seed':>6s} {'fp32':>8s} {'bf16':>8s} {'bf16-fp32':>10s}"]
    for seed in result["seeds"]:
        fp32, bf16 = (result["validation_accuracy"][name][seed] for name in ("fp32", "bf16"))
        lines.append(f"{seed:>6s} {fp32:8.4f} {bf16:8.4f} {bf16 - fp32:+10.4f}")
    low, high = result["equivalence_interval"]
    lines.append(
        f"mean difference {result['difference_mean']:+.4f}, 90% interval [{low:+.4f}, {high:+.4f}] against "
        f"+-{result['margin']}: {result['verdict']}; training {result['train_seconds']} s "
        f"({len(result['seeds'])} models x {result['epochs']} epochs, {result['device']})"
    )
    return "\n".join(lines)


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="models per precision, seeds 0..N-1")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--params", type=Path, default=config.DEFAULT_PARAMS)
    parser.add_argument("--variant", default="d2l", help="the params.yaml variant whose settings are trained")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared/fashion_mnist"))
    parser.add_argument("--results", type=Path, default=RESULTS / "precision.json")
    args = parser.parse_args()
    if args.seeds < 2:
        raise PipelineError(f"--seeds: got {args.seeds}, expected 2 or more (the test pairs seeds)")
    splits = {split: args.prepared / f"{split}.pt" for split in ("train", "validation")}
    missing = [str(path) for path in splits.values() if not path.is_file()]
    if missing:
        raise PipelineError(f"--prepared: missing {', '.join(missing)}; expected `dvc repro prepare` to have run")
    data = {split: tensors.load_split(path) for split, path in splits.items()}
    if len(data["validation"][1]) == 0:
        raise PipelineError(f"{splits['validation']}: no images; expected prepare.validation above 0")
    params = config.load(args.params).variant(args.variant)
    result = run(params, list(range(args.seeds)), data["train"], data["validation"], args.device)
    write_result(args.results, result, ["python", "-m", "benchmarks.precision", *sys.argv[1:]])
    print(table(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
