"""Benchmark: one grid of d2l's MLPs trained by the local executor and by the Ray executor on two 1-CPU nodes.

`python -m benchmarks.scale_out [--models 32] [--chunk 4] [--epochs 4] [--samples 30000] [--rounds 3]
[--local-threads N] [--address host:port]` splits `--models` seeds into chunks of `--chunk`, and times in one
process, round by round so that drift hits both alike, the whole grid: `local` (chunk after chunk in this
process, torch on all its threads as a stage runs, or on `--local-threads`) and `ray` (one 1-CPU task per chunk,
end to end: connecting, the data put once in the object store, the job's workers starting and importing torch,
the tasks, the results gathered). Without `--address` it starts a two-node cluster of 1 CPU each on this machine
(tests/ray_cluster.py) and stops it after. The first round warms up; each figure is the median of the others,
as models per second (each epoch counted: models x epochs / s) and the ratio ray / local, against the goal of
0.8. The data are random, Fashion-MNIST-shaped and standardized: the time of a dense MLP does not depend on the
values. The default grid (128 model-epochs) is meant to dwarf the Ray path's fixed cost per sweep (seconds:
connecting, each node's workers starting), as a real sweep of hundreds of models does. The figures move with
the machine's load (torch's threads in one process suffer most from cores taken by others), so the load
average is kept with them. Prints a table, then one JSON line; the JSON is kept in
benchmarks/results/scale_out.json with the machine, the command and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench import RESULTS, write_result
from pipeline import batched
from pipeline import model as mlp
from pipeline.cli import stage_entry
from pipeline.errors import PipelineError
from pipeline.executor import ExecutorParams, run_chunks

GOAL = 0.8  # the Ray path keeps at least this share of the local throughput
FEATURES, CLASSES, HIDDEN = 784, 10, (256,)
LR, BATCH, INIT_STD = 0.1, 256, 0.01  # d2l's


def train_chunk(seeds: tuple[int, ...], shared: dict) -> list[list[float]]:
    """The timed call: d2l's MLPs for these seeds trained together by the batched trainer in fp32; per model its
    mean training loss per epoch. Point this at the trainer's chunk function when that API changes."""
    images, labels, epochs = shared["images"], shared["labels"], shared["epochs"]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    models = [mlp.build("module", HIDDEN, "relu", INIT_STD, generator) for generator in generators]
    stack = batched.stack(models, torch.device("cpu"))
    losses = [batched.sgd_epoch(stack, LR, images, labels, BATCH, generators, "fp32")[0] for _ in range(epochs)]
    return (torch.stack([loss.sum(1) for loss in losses], 1) / len(labels)).tolist()


def grid_data(samples: int, epochs: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (samples,), generator=generator)
    return {"images": images, "labels": labels, "epochs": epochs}


def timed(chunks: list, shared: dict, settings: ExecutorParams) -> float:
    """Wall seconds of the whole grid through one executor."""
    started = time.perf_counter()
    run_chunks(train_chunk, chunks, shared, settings)
    return time.perf_counter() - started


def measure(chunks: list, shared: dict, address: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per round for each executor, alternating; the first round is a warm-up and is dropped."""
    settings = {"local": ExecutorParams(), "ray": ExecutorParams(executor="ray", ray_address=address, num_cpus=1)}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for round_number in range(rounds + 1):
        for name, setting in settings.items():
            elapsed = timed(chunks, shared, setting)
            print(
                f"round {round_number} {name:5s} {elapsed:6.1f} s{' (warm-up)' if round_number == 0 else ''}",
                flush=True,
            )
            if round_number > 0:
                seconds[name].append(elapsed)
    return seconds


def run(
    models: int, chunk: int, epochs: int, samples: int, rounds: int, address: str | None, local_threads: int | None
) -> dict:
    """The figures of one benchmark run; a two-node cluster of its own when no address is given."""
    if local_threads is not None:
        torch.set_num_threads(local_threads)
    try:
        import ray.cloudpickle
    except ImportError:
        raise PipelineError("Ray is not installed; install the extra: pip install '.[ray]'") from None
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers get train_chunk without benchmarks/
    chunks = [tuple(range(start, min(start + chunk, models))) for start in range(0, models, chunk)]
    shared, cluster = grid_data(samples, epochs), None
    load_at_start = os.getloadavg()[0]
    if address is None:
        from tests.ray_cluster import start_cluster

        cluster = start_cluster()
        address = cluster.address
    try:
        seconds = measure(chunks, shared, address, rounds)
    finally:
        if cluster is not None:
            cluster.stop()
    rate = {name: models * epochs / statistics.median(values) for name, values in seconds.items()}
    return {
        "models": models,
        "chunk": chunk,
        "epochs": epochs,
        "samples": samples,
        "rounds": rounds,
        "cluster": "own: 2 nodes x 1 CPU on this machine" if cluster else address,
        "local_threads": torch.get_num_threads(),
        "seconds": {name: [round(value, 2) for value in values] for name, values in seconds.items()},
        "models_per_s": {name: round(value, 3) for name, value in rate.items()},
        "ratio_ray_vs_local": round(rate["ray"] / rate["local"], 3),
        "goal": GOAL,
        "load_average_at_start": round(load_at_start, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }


def table(result: dict) -> str:
    rate = result["models_per_s"]
    return "\n".join(
        [
            f"{result['models']} models x {result['epochs']} epochs on {result['samples']} images, chunks of "
            f"{result['chunk']}, median of {result['rounds']} rounds after a warm-up",
            f"local ({result['local_threads']} threads)   {rate['local']:.2f} models/s (each epoch counted)",
            f"ray ({result['cluster']})   {rate['ray']:.2f} models/s (each epoch counted)",
            f"ray / local {result['ratio_ray_vs_local']:.2f}x (goal >= {GOAL}x); load average "
            f"{result['load_average_at_start']:.2f} at start, {result['load_average_at_end']:.2f} at end",
        ]
    )


@stage_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=32, help="seeds in the grid")
    parser.add_argument("--chunk", type=int, default=4, help="models per chunk (per Ray task)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=30000, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up round")
    parser.add_argument("--local-threads", type=int, help="torch threads of the local run; default: torch's own")
    parser.add_argument("--address", help="host:port of an existing Ray cluster; default: start two local nodes")
    parser.add_argument("--results", type=Path, default=RESULTS / "scale_out.json", help="where the JSON is kept too")
    args = parser.parse_args()
    for name in ("models", "chunk", "epochs", "samples", "rounds", "local_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected 1 or more")
    result = run(args.models, args.chunk, args.epochs, args.samples, args.rounds, args.address, args.local_threads)
    write_result(args.results, result, ["python", "-m", "benchmarks.scale_out", *sys.argv[1:]])
    print(table(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
