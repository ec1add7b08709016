"""Benchmark: our training epoch against the matrix multiplies it needs and against d2l's DataLoader pipeline.

`python -m benchmarks.bench [--quick] [--device auto|cpu|cuda]` times, in one process and round by round so
that drift hits all alike, one epoch (train + test evaluation) of: d2l's pipeline (torchvision FashionMNIST +
ToTensor, DataLoader with 4 workers, the loops as the book writes them); our stage's own `train.train_epoch`
+ `train.evaluate` on the prepared tensors; only the GEMMs such an epoch needs; and our epoch at hidden width
1, whose GEMMs cost ~nothing, so it measures the per-step price of eager PyTorch. The first round warms up;
each figure is the median of the others. Prints a table, then one JSON line.
It also counts models per second (training epochs only): one seed alone in fp32 (today's loop), `--models`
seeds trained together by pipeline/batched.py in fp32 and in bf16, and the bf16 batched epoch's GEMMs alone;
the JSON is kept in benchmarks/results/bench.json with the machine and the command.
Then, untimed, d2l's pipeline and ours train on to 10 epochs (for `--seeds` seeds) to compare test accuracy.
On 2 threads of an AMD EPYC VM our epoch takes ~0.5 s, ~1.1-1.2x its GEMMs and ~15-18x less than d2l's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline import batched, config, tensors
from pipeline import model as mlp
from pipeline.cli import stage_entry
from pipeline.datasets import FILE_KINDS
from pipeline.errors import PipelineError
from pipeline.files import write_json
from pipeline.stages import prepare, train

EPOCHS = {"quick": 5, "full": 10}  # timed
ACCURACY_EPOCHS = 10  # d2l's; the accuracies compared are after this many
D2L_WORKERS = 4  # d2l's get_dataloader_workers()
BATCHED_MODELS = 5  # a variant's seeds, trained together as one batched computation
EVALUATE_BATCH = 10000  # train.evaluate's default, the one train.run uses
SPLIT_COUNTS = {"train": 60000, "test": 10000}
SPLITS = tuple(SPLIT_COUNTS)
RESULTS = Path(__file__).parent / "results"


def write_synthetic_idx(directory: Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Random uint8 images and labels 0-9 in the four IDX files (Fashion-MNIST's sizes unless `counts` says)."""
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (counts or SPLIT_COUNTS).items():
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=generator)
        for kind, array in (("images", images), ("labels", labels)):
            header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
            (directory / FILE_KINDS[f"{split}_{kind}"]).write_bytes(header + array.numpy().tobytes())
    return directory


def torchvision_root(raw_dir: Path, temp: Path) -> Path:
    """The layout torchvision's FashionMNIST reads (root/FashionMNIST/raw/<idx files>), as symlinks."""
    folder = temp / "torchvision" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for name in FILE_KINDS.values():
        (folder / name).symlink_to((raw_dir / name).resolve())
    return temp / "torchvision"


def bench_data(raw_dir: Path, prepared_dir: Path, temp: Path, normalize: bool) -> tuple[Path, Path, str]:
    """Raw and prepared directories to use, and where they come from; generated when the real data is absent."""
    source = str(raw_dir)
    if not all((raw_dir / name).is_file() for name in FILE_KINDS.values()):
        raw_dir, prepared_dir, source = write_synthetic_idx(temp / "raw"), temp / "prepared", "generated"
    if not all((prepared_dir / f"{split}.pt").is_file() for split in SPLITS) or holds_out(prepared_dir):
        prepared_dir = temp / "prepared"
        prepare.run(raw_dir, prepared_dir, normalize)  # d2l's split: all 60,000 train images, no validation
    return raw_dir, prepared_dir, source


def holds_out(prepared_dir: Path) -> bool:
    """True when the pipeline's prepared data keeps validation images out of train: d2l trains on all of them."""
    validation = prepared_dir / "validation.pt"
    return validation.is_file() and len(tensors.load_split(validation)[1]) > 0


def timed(function: Callable[[], float | None], device: torch.device) -> tuple[float, float | None]:
    """Wall time of one call; on a GPU the queue is drained before and after, so no work leaks across."""
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - started, result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def d2l_epoch(root: Path, device: torch.device, workers: int, seed: int) -> Callable[[], float]:
    """d2l's pipeline (sections 3.5-3.7 and 5.2): one call trains one epoch and returns the test accuracy."""
    from torch.utils import data
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    trans = transforms.ToTensor()
    train_iter = data.DataLoader(
        datasets.FashionMNIST(root, train=True, transform=trans, download=False),
        256,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    test_iter = data.DataLoader(
        datasets.FashionMNIST(root, train=False, transform=trans, download=False),
        256,
        shuffle=False,
        num_workers=workers,
    )
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    net.apply(lambda m: nn.init.normal_(m.weight, std=0.01) if type(m) == nn.Linear else None)  # noqa: E721 - d2l's code as printed
    net.to(device)
    loss = nn.CrossEntropyLoss(reduction="none")
    updater = torch.optim.SGD(net.parameters(), lr=0.1)

    def epoch() -> float:
        net.train()
        for X, y in train_iter:  # train_epoch_ch3, with its per-step float(l.sum()) and accuracy()
            X, y = X.to(device), y.to(device)
            y_hat = net(X)
            l = loss(y_hat, y)  # noqa: E741 - d2l's names, as printed
            updater.zero_grad()
            l.mean().backward()
            updater.step()
            float(l.detach().sum()), float((y_hat.argmax(axis=1).type(y.dtype) == y).type(y.dtype).sum())
        return d2l_evaluate_accuracy(net, test_iter, device)

    return epoch


def d2l_evaluate_accuracy(net: nn.Module, data_iter, device: torch.device) -> float:
    """d2l's evaluate_accuracy: batch by batch through the DataLoader, without autograd."""
    net.eval()
    correct, count = 0.0, 0
    with torch.no_grad():
        for X, y in data_iter:
            X, y = X.to(device), y.to(device)
            correct += float((net(X).argmax(axis=1).type(y.dtype) == y).type(y.dtype).sum())
            count += y.numel()
    return correct / count


def our_epoch(
    params: config.TrainParams,
    device: torch.device,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> tuple[Callable[[], float], nn.Module]:
    """The stage's epoch for one seed, exactly the calls train.run makes (the trainer with M = 1); it and the model."""
    one = dataclasses.replace(params, seeds=(seed,))
    net = train.initial_model(one, seed, device)
    group = train.Group(one, [net], device)
    shuffles = [torch.Generator(device=device).manual_seed(seed)]
    train_images, train_labels = (tensor.to(device) for tensor in train_data)
    test_images, test_labels = (tensor.to(device) for tensor in test_data)

    def epoch() -> float:
        step_losses, correct = group.epoch(train_images, train_labels, shuffles)
        step_losses.tolist(), correct.tolist()
        return batched.evaluate(group.weights(), test_images, test_labels, params.loss).accuracy[0].item()

    return epoch, net


def gemm_epoch(
    net: nn.Module, batch_size: int, train_images: torch.Tensor, test_images: torch.Tensor
) -> Callable[[], None]:
    """Only the matrix multiplies of one epoch, in the model's own weight layout and dtype: per step the
    forward X@W per layer, then backward dW per layer and dH for all but the input layer; then the test forward."""
    weights = [parameter.detach().clone() for parameter in net.parameters() if parameter.dim() == 2]
    # nn.Linear stores W as [out, in] and multiplies by W.T; the scratch form stores [in, out].
    # Autograd computes dW in the stored layout (dY.T @ X for nn.Linear), so the bound does too.
    linear = not isinstance(net, mlp.ScratchMLP)
    forward = [weight.T if linear else weight for weight in weights]

    def epoch() -> None:
        for x in train_images.split(batch_size):
            activations = [x]
            for weight in forward:
                activations.append(activations[-1] @ weight)
            grad = activations[-1]  # a stand-in for dL/dlogits: only its shape matters
            for layer in reversed(range(len(forward))):
                grad.T @ activations[layer] if linear else activations[layer].T @ grad  # dW
                if layer > 0:
                    grad = grad @ forward[layer].T  # dH
        with torch.inference_mode():
            for x in test_images.split(EVALUATE_BATCH):
                for weight in forward:
                    x = x @ weight

    return epoch


def single_train_epoch(
    params: config.TrainParams, device: torch.device, train_data: tuple[torch.Tensor, torch.Tensor], seed: int
) -> Callable[[], None]:
    """One model's training epoch alone (no evaluation), in fp32."""
    return batched_train_epoch(params, device, train_data, [seed], "fp32")[0]


def batched_train_epoch(
    params: config.TrainParams,
    device: torch.device,
    train_data: tuple[torch.Tensor, torch.Tensor],
    seeds: list[int],
    precision: str,
) -> tuple[Callable[[], None], batched.Stack, torch.Tensor]:
    """The training epoch of one model per seed as one batched computation; returns it, its stack and inputs."""
    models = [
        mlp.build(params.impl, params.hidden, "relu", params.init_std, torch.Generator().manual_seed(seed))
        for seed in seeds
    ]
    stacked = batched.stack(models, device)
    step = batched.optimizer("sgd", stacked, params.lr)
    images, labels = train_data
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def epoch() -> None:
        losses, correct = batched.train_epoch(
            stacked, step, images, labels, params.batch_size, generators, precision=precision
        )
        losses.tolist(), correct.tolist()

    return epoch, stacked, images.to(torch.bfloat16) if precision == "bf16" else images


def batched_gemm_epoch(stacked: batched.Stack, batch_size: int, inputs: torch.Tensor) -> Callable[[], None]:
    """Only the GEMMs of a batched epoch on `inputs` (in their dtype): per step the forward per layer, dW per
    layer and dH for all but the input layer, each one bmm over the M models."""
    weights = [weight.to(inputs.dtype) for weight in stacked.weights]
    biases = [bias.to(inputs.dtype).unsqueeze(1) for bias in stacked.biases]
    block = inputs[:batch_size].expand(stacked.models, -1, -1).contiguous()  # [M, batch, 784]: what a step reads

    def epoch() -> None:
        for start in range(0, len(inputs), batch_size):
            activations = [block[:, : min(batch_size, len(inputs) - start)]]
            for weight, bias in zip(weights, biases):
                activations.append(torch.baddbmm(bias, activations[-1], weight))
            grad = activations[-1]  # a stand-in for dL/dlogits: only its shape matters
            for layer in reversed(range(len(weights))):
                torch.bmm(activations[layer].transpose(1, 2), grad)  # dW
                if layer > 0:
                    grad = torch.bmm(grad, weights[layer].transpose(1, 2))  # dH

    return epoch


def batched_pipelines(
    params: config.TrainParams, device: torch.device, train_data: tuple[torch.Tensor, torch.Tensor], seeds: list[int]
) -> dict[str, Callable[[], None]]:
    """Training epochs to count models per second by: one seed alone in fp32, the seeds batched in fp32 and in
    bf16, and the bf16 batched epoch's GEMMs alone."""
    bf16_epoch, stacked, inputs = batched_train_epoch(params, device, train_data, seeds, "bf16")
    return {
        "fp32_single": single_train_epoch(params, device, train_data, seeds[0]),
        "fp32_batched": batched_train_epoch(params, device, train_data, seeds, "fp32")[0],
        "bf16_batched": bf16_epoch,
        "bf16_gemm": batched_gemm_epoch(stacked, params.batch_size, inputs),
    }


def models_per_second(seconds: dict[str, list[float]], models: int) -> dict:
    """Model-epochs of training per second (medians after the warm-up) and the bf16 batched epoch over its GEMMs."""
    median = {name: statistics.median(values[1:] or values) for name, values in seconds.items()}
    counts = {"fp32_single": 1, "fp32_batched": models, "bf16_batched": models, "bf16_gemm": models}
    return {
        "models_per_s": {name: _digits(count / median[name]) for name, count in counts.items()},
        "bf16_ratio_vs_gemm": _digits(median["bf16_batched"] / median["bf16_gemm"]),
        "batched_models": models,
    }


def measure(
    epochs: dict[str, Callable[[], float | None]],
    rounds: int,
    device: torch.device,
    report: Callable[[str], None] = print,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each round runs every pipeline's epoch once; returns the seconds per round and the last accuracies."""
    seconds = {name: [] for name in epochs}
    accuracy = {}
    slow, *fast = epochs
    for index in range(rounds):
        # The fast ones run back to back in alternating order: a load that comes and goes hits them alike.
        for name in [slow, *(fast if index % 2 == 0 else fast[::-1])]:
            elapsed, result = timed(epochs[name], device)
            seconds[name].append(elapsed)
            if result is not None:
                accuracy[name] = result
        report(
            f"epoch {index + 1:2d}/{rounds}{' (warm-up)' if index == 0 else ''}: "
            + "  ".join(f"{name} {seconds[name][-1]:.3f} s" for name in epochs)
        )
    return seconds, accuracy


def summarize(seconds: dict[str, list[float]]) -> dict:
    """Medians after the warm-up round and the ratios taken from them."""
    median = {name: statistics.median(values[1:] or values) for name, values in seconds.items()}
    return {
        "epoch_s": _digits(median["ours"]),
        "gemm_bound_s": _digits(median["gemm"]),
        "d2l_epoch_s": _digits(median["d2l"]),
        "ratio_vs_gemm": _digits(median["ours"] / median["gemm"]),
        "speedup_vs_d2l": _digits(median["d2l"] / median["ours"]),
        "floor_epoch_s": _digits(median["floor"]),
        "ratio_floor": _digits((median["gemm"] + median["floor"]) / median["gemm"]),
        "epochs": len(seconds["ours"]),
        "measured_epochs": len(seconds["ours"][1:] or seconds["ours"]),
        "seconds": {name: [_digits(value) for value in values] for name, values in seconds.items()},
    }


def accuracy_study(
    runs: list[dict[str, Callable[[], float]]], trained: dict[str, tuple[int, float]], seeds: list[int]
) -> dict:
    """Train every run on, untimed, to ACCURACY_EPOCHS; `trained` holds (epochs, last accuracy) of the first
    seed's runs that the timed rounds have trained. Test accuracies per seed and their means, and ours minus
    d2l's in points, on both kinds of input."""
    accuracy = {name: [] for name in runs[0]}
    for index, epochs in enumerate(runs):
        for name, epoch in epochs.items():
            done, last = trained.get(name, (0, None)) if index == 0 else (0, None)
            for _ in range(ACCURACY_EPOCHS - done):
                last = epoch()
            accuracy[name].append(last)
    mean = {name: statistics.fmean(values) for name, values in accuracy.items()}
    return {
        "test_accuracy": _digits(mean["ours"]),
        "d2l_test_accuracy": _digits(mean["d2l"]),
        "test_accuracy_d2l_inputs": _digits(mean["ours_d2l_inputs"]),
        "accuracy_gap_points": _digits(100 * (mean["ours"] - mean["d2l"])),
        "accuracy_gap_points_d2l_inputs": _digits(100 * (mean["ours_d2l_inputs"] - mean["d2l"])),
        "accuracy_epochs": max(ACCURACY_EPOCHS, *(done for done, _ in trained.values())),
        "accuracy_seeds": seeds,
        "accuracy": accuracy,
    }


def _digits(value: float) -> float:
    return float(f"{value:.5g}")


def run(
    params: config.TrainParams,
    normalize: bool,
    raw_dir: Path,
    prepared_dir: Path,
    device_name: str,
    epochs: int,
    workers: int = D2L_WORKERS,
    report: Callable[[str], None] = print,
    seeds: int = 1,
    models: int = BATCHED_MODELS,
) -> dict:
    """Time `epochs` interleaved epochs of the eight pipelines, then compare accuracies; the JSON line's figures."""
    device = train.resolve_device(device_name)
    load_at_start = os.getloadavg()[0]  # other work on the machine skews every figure; our own runs add to it later
    with tempfile.TemporaryDirectory(prefix="bench.") as temp_name:
        temp = Path(temp_name)
        raw_dir, prepared_dir, source = bench_data(raw_dir, prepared_dir, temp, normalize)
        train_data, test_data = (_on(device, tensors.load_split(prepared_dir / f"{split}.pt")) for split in SPLITS)
        first_seed = params.seeds[0]
        ours, net = our_epoch(params, device, train_data, test_data, first_seed)
        # The floor: the same steps with hidden width 1, so the GEMMs cost ~nothing and what is left is the
        # per-step price of eager PyTorch (dispatch, autograd and the optimizer) plus the batch gather.
        width_one = dataclasses.replace(params, hidden=(1,) * len(params.hidden))
        floor, _ = our_epoch(width_one, device, train_data, test_data, first_seed)
        root = torchvision_root(raw_dir, temp)
        pipelines = {
            "d2l": d2l_epoch(root, device, workers, first_seed),
            "ours": ours,
            "gemm": gemm_epoch(net, params.batch_size, train_data[0], test_data[0]),
            "floor": floor,
            **batched_pipelines(params, device, train_data, [first_seed + index for index in range(models)]),
        }
        seconds, last_accuracy = measure(pipelines, epochs, device, report)
        # Untimed: d2l's pipeline and ours trained on to ACCURACY_EPOCHS, and ours on d2l's own inputs
        # (pixels / 255, as ToTensor gives), which tells the code's accuracy apart from what our
        # normalization adds; `seeds` > 1 repeats all three from scratch with the next seeds.
        pixels = [_on(device, prepare.read_raw_split(raw_dir, split)) for split in SPLITS]
        seed_list = [first_seed + offset for offset in range(seeds)]
        runs = [
            {
                "d2l": pipelines["d2l"],
                "ours": ours,
                "ours_d2l_inputs": our_epoch(params, device, *pixels, first_seed)[0],
            }
        ]
        for seed in seed_list[1:]:
            runs.append(
                {
                    "d2l": d2l_epoch(root, device, workers, seed),
                    "ours": our_epoch(params, device, train_data, test_data, seed)[0],
                    "ours_d2l_inputs": our_epoch(params, device, *pixels, seed)[0],
                }
            )
        report(f"accuracy after {max(ACCURACY_EPOCHS, epochs)} epochs, seeds {seed_list} (untimed)")
        accuracy = accuracy_study(runs, {name: (epochs, last_accuracy[name]) for name in ("d2l", "ours")}, seed_list)
    return {
        **summarize(seconds),
        **models_per_second(seconds, models),
        **accuracy,
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "d2l_workers": workers,
        "data": source,
        "load_average_at_start": load_at_start,
    }


def _on(device: torch.device, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(tensor.to(device) for tensor in tensors)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    return names[0] if names else platform.processor() or platform.machine()


def table(result: dict) -> str:
    seconds = result["seconds"]
    rows = [
        ("d2l: DataLoader + ToTensor", "d2l", result["d2l_epoch_s"]),
        ("ours: train_epoch + evaluate", "ours", result["epoch_s"]),
        ("GEMMs only", "gemm", result["gemm_bound_s"]),
        ("ours at hidden width 1", "floor", result["floor_epoch_s"]),
    ]
    lines = [f"{'one epoch (train + test)':30s} {'median s':>9s} {'min s':>8s}"]
    lines += [
        f"{label:30s} {median:9.3f} {min(seconds[name][1:] or seconds[name]):8.3f}" for label, name, median in rows
    ]
    lines.append(
        f"ours / GEMMs {result['ratio_vs_gemm']:.2f}x (GEMMs + width-1 floor: {result['ratio_floor']:.2f}x), "
        f"d2l / ours {result['speedup_vs_d2l']:.1f}x: medians of {result['measured_epochs']} epochs after a "
        f"warm-up"
    )
    lines.append(models_line(result))
    lines.append(
        f"test accuracy after {result['accuracy_epochs']} epochs, mean of seeds {result['accuracy_seeds']}: "
        f"ours {result['test_accuracy']:.4f}, d2l {result['d2l_test_accuracy']:.4f} "
        f"({result['accuracy_gap_points']:+.2f} points); ours on d2l's unnormalized inputs "
        f"{result['test_accuracy_d2l_inputs']:.4f} ({result['accuracy_gap_points_d2l_inputs']:+.2f} points)"
    )
    lines.append(
        f"{result['device']} ({result['device_name']}), {result['threads']} threads, torch {result['torch']}, "
        f"data {result['data']}, load average at start {result['load_average_at_start']:.2f}"
    )
    return "\n".join(lines)


def models_line(result: dict) -> str:
    """Models per second and the ratios the issue sets goals for (bf16 >= 3x fp32 one seed, <= 1.3x its GEMMs)."""
    rate = result["models_per_s"]
    return (
        f"models per second (training epochs): fp32 one seed {rate['fp32_single']:.2f}, "
        f"{result['batched_models']} batched: fp32 {rate['fp32_batched']:.2f}, bf16 {rate['bf16_batched']:.2f}, "
        f"bf16 GEMMs alone {rate['bf16_gemm']:.2f}; bf16 batched / fp32 one seed "
        f"{rate['bf16_batched'] / rate['fp32_single']:.2f}x, bf16 batched takes {result['bf16_ratio_vs_gemm']:.2f}x "
        f"its GEMMs' time"
    )


def write_result(path: Path, result: dict, command: list[str]) -> None:
    """The JSON line's figures, with the machine and the command, to a file kept in git (benchmarks/results)."""
    from pipeline.devices import machine

    system = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    figures = {**result, "machine": machine(), "system": system, "command": " ".join(command), "commit": commit}
    write_json(path, figures)


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{EPOCHS['quick']} epochs instead of {EPOCHS['full']}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--params", type=Path, default=config.DEFAULT_PARAMS)
    parser.add_argument("--variant", default="d2l", help="the params.yaml variant whose training epoch is timed")
    parser.add_argument("--raw", type=Path, default=Path("data/raw/fashion_mnist"), help="the four IDX files")
    parser.add_argument(
        "--prepared",
        type=Path,
        default=Path("data/prepared/fashion_mnist"),
        help="train.pt and test.pt; made from --raw when absent",
    )
    parser.add_argument("--models", type=int, default=BATCHED_MODELS, help="models trained together when batched")
    parser.add_argument("--results", type=Path, default=RESULTS / "bench.json", help="where the JSON is kept too")
    parser.add_argument("--workers", type=int, default=D2L_WORKERS, help="DataLoader workers of the d2l pipeline")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help=f"seeds whose accuracy after {ACCURACY_EPOCHS} epochs is averaged (each costs "
        f"{ACCURACY_EPOCHS} more epochs of d2l's pipeline)",
    )
    args = parser.parse_args()
    for name, value in (("--seeds", args.seeds), ("--models", args.models)):
        if value < 1:
            raise PipelineError(f"{name}: got {value}, expected 1 or more")
    params = config.load(args.params)
    result = run(
        params.variant(args.variant),
        params.prepare.normalize,
        args.raw,
        args.prepared,
        args.device,
        EPOCHS["quick" if args.quick else "full"],
        args.workers,
        seeds=args.seeds,
        models=args.models,
    )
    write_result(args.results, result, ["python", "-m", "benchmarks.bench", *sys.argv[1:]])
    print(table(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
