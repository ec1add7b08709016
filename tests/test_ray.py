"""The executor: local and on a real two-node Ray cluster (same figures, both nodes used, a node lost mid-run),
and its one-line errors.

The training function the tasks run lives here and reaches the workers pickled by value (cloudpickle's
register_pickle_by_value): the way a user's own script function travels, without making tests/ (and its
conftest's imports) importable on the workers. The cluster tests are marked `ray` and `integration`, as
tests/test_team.py's are `team` and `integration`, so the fast tier leaves them out.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.executor import ChunkResult, ExecutorParams, run_chunks
from tests.conftest import tool_env
from tests.ray_cluster import RayCluster, free_port, start_cluster

FEATURES, HIDDEN, CLASSES = 32, 16, 4
TOLERANCE = 1e-6
REPO = Path(__file__).resolve().parents[1]


def shared_data(samples: int = 512, epochs: int = 2, started: str = "") -> dict:
    """Random inputs with learnable labels (the argmax of a fixed linear map), and how to train on them."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, FEATURES, generator=generator)
    labels = (images @ torch.randn(FEATURES, CLASSES, generator=generator)).argmax(1)
    return {"images": images, "labels": labels, "epochs": epochs, "started": started}


def train_chunk(seeds: tuple[int, ...], shared: dict) -> list[dict]:
    """Per seed, a small ReLU MLP trained by plain SGD (batch 32, lr 0.1): its mean loss per epoch and the
    norm of its final weights. With `started` set, first appends "<seeds> <node id>" to that file."""
    if shared["started"]:
        import ray

        with open(shared["started"], "a") as log:
            log.write(f"{','.join(map(str, seeds))} {ray.get_runtime_context().get_node_id()}\n")
    return [train_one(seed, shared["images"], shared["labels"], shared["epochs"]) for seed in seeds]


def train_one(seed: int, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(labels), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(total / len(labels))
    weight_norm = sum(parameter.detach().square().sum() for parameter in model.parameters()).sqrt().item()
    return {"seed": seed, "losses": losses, "weight_norm": weight_norm}


def run_local_one_thread(chunks: list, shared: dict) -> list[ChunkResult]:
    """The local executor with torch on 1 thread, as each 1-CPU Ray task runs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_chunks(train_chunk, chunks, shared, ExecutorParams())
    finally:
        torch.set_num_threads(previous)


def assert_same_figures(expected: list[ChunkResult], actual: list[ChunkResult]) -> None:
    assert len(actual) == len(expected)
    for want_chunk, got_chunk in zip(expected, actual):
        assert [model["seed"] for model in got_chunk.value] == [model["seed"] for model in want_chunk.value]
        for want, got in zip(want_chunk.value, got_chunk.value):
            assert got["losses"] == pytest.approx(want["losses"], abs=TOLERANCE, rel=0)
            assert got["weight_norm"] == pytest.approx(want["weight_norm"], abs=TOLERANCE, rel=0)


@pytest.fixture(scope="module")
def cluster():
    """One two-node cluster for the module (a start costs ~15 s); it must leave no process of its own behind."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = start_cluster()
    try:
        yield started
    finally:
        started.stop()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert started.processes() == [], "the cluster fixture left processes behind"


def two_nodes(cluster: RayCluster) -> dict[str, str]:
    """The live nodes by role, with the worker node started again if a test killed it."""
    nodes = cluster.nodes()
    if "worker" not in nodes:
        cluster.start_worker()
        nodes = cluster.wait_for_nodes(2)
    return nodes


def test_local_runs_every_chunk_in_order_in_this_process():
    reported = []
    results = run_chunks(
        lambda chunk, shared: [seed * shared for seed in chunk],
        [(1, 2), (3,)],
        10,
        ExecutorParams(),
        on_result=lambda index, result: reported.append((index, result)),
    )
    assert results == [ChunkResult([10, 20], "local"), ChunkResult([30], "local")]
    assert reported == list(enumerate(results))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ExecutorParams(executor="dask"), "executor: got 'dask', expected one of local, ray"),
        (ExecutorParams(executor="ray", num_cpus=0), "num_cpus: got 0, expected a number above 0"),
        (ExecutorParams(executor="ray", max_retries=-1), "max_retries: got -1, expected 0 or more"),
        (ExecutorParams(executor="ray", ray_address="head-node"), "ray_address: got 'head-node', expected auto"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(settings, message):
    with pytest.raises(PipelineError) as error:
        run_chunks(train_chunk, [(0,)], shared_data(), settings)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_importing_the_executor_does_not_import_ray():
    code = "import sys, pipeline.executor; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_ray_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
    with pytest.raises(PipelineError, match=r"^executor ray: Ray is not installed; install the extra"):
        run_chunks(train_chunk, [(0,)], shared_data(), ExecutorParams(executor="ray", ray_address="127.0.0.1:1"))


@pytest.mark.ray
@pytest.mark.integration
def test_auto_takes_ray_address_from_the_environment(monkeypatch):
    port = free_port()  # closed again: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(PipelineError, match=rf"^ray_address 'auto': no Ray cluster answers at \S+:{port} "):
        run_chunks(train_chunk, [(0,)], shared_data(), ExecutorParams(executor="ray"))


# A stage's view of an unreachable cluster: its main() under stage_entry, in a fresh process.
UNREACHABLE = """
from pipeline.cli import stage_entry
from pipeline.executor import ExecutorParams, run_chunks
stage_entry(lambda: run_chunks(max, [1, 2], 0, ExecutorParams(executor="ray", ray_address="127.0.0.1:{port}")))()
"""


@pytest.mark.ray
@pytest.mark.integration
def test_an_unreachable_address_is_one_error_line_in_seconds(tmp_path):
    port = free_port()  # closed again: nothing listens there
    code = textwrap.dedent(UNREACHABLE.format(port=port))
    # ray.init alone retries such an address for minutes; the bound here only needs to be far below that
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=tool_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: ray_address '127.0.0.1:{port}': no Ray cluster answers at ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert list(tmp_path.iterdir()) == []  # wrote nothing


@pytest.mark.ray
@pytest.mark.integration
def test_chunks_run_on_both_nodes_with_the_local_figures(cluster):
    nodes = two_nodes(cluster)
    chunks, shared = [(0, 1), (2, 3), (4, 5), (6, 7)], shared_data()
    reported = []
    stage_handler = lambda signum, frame: None  # a stage's SIGTERM handler (cli.stage_entry sets one)
    previous = signal.signal(signal.SIGTERM, stage_handler)
    try:
        remote = run_chunks(
            train_chunk,
            chunks,
            shared,
            ExecutorParams(executor="ray", ray_address=cluster.address, num_cpus=1),
            on_result=lambda index, result: reported.append((index, signal.getsignal(signal.SIGTERM))),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert {result.node for result in remote} == set(nodes.values())
    assert sorted(reported, key=lambda pair: pair[0]) == [(index, stage_handler) for index in range(4)]
    assert_same_figures(run_local_one_thread(chunks, shared), remote)


@pytest.mark.ray
@pytest.mark.integration
def test_a_chunk_that_fails_for_good_is_one_line_naming_it(cluster):
    two_nodes(cluster)
    settings = ExecutorParams(executor="ray", ray_address=cluster.address, max_retries=1)
    with pytest.raises(PipelineError) as error:
        run_chunks(train_chunk, [(0,), ("x",)], shared_data(), settings)
    assert str(error.value).startswith("chunk 1 of 2 failed (RuntimeError")  # torch rejects the seed
    assert "\n" not in str(error.value)


@pytest.mark.ray
@pytest.mark.integration
def test_killing_the_worker_node_mid_run_loses_no_chunk(cluster, tmp_path):
    nodes = two_nodes(cluster)
    started = tmp_path / "started"
    started.touch()
    chunks = [(0,), (1,), (2,), (3,)]
    shared = shared_data(samples=2048, epochs=20, started=str(started))  # a chunk takes seconds: killed mid-run
    left_alive: list = []

    def kill_worker_node_once_it_trains() -> None:
        deadline = time.monotonic() + 120
        while nodes["worker"] not in started.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        left_alive.extend(cluster.kill("worker"))

    killer = threading.Thread(target=kill_worker_node_once_it_trains)
    killer.start()
    try:
        remote = run_chunks(
            train_chunk, chunks, shared, ExecutorParams(executor="ray", ray_address=cluster.address, max_retries=3)
        )
    finally:
        killer.join()
    assert left_alive == [] and cluster.processes("worker") == []
    lines = [line.split() for line in started.read_text().splitlines()]
    started_on_worker = {int(seeds) for seeds, node in lines if node == nodes["worker"]}
    assert started_on_worker, "no chunk started on the worker node"
    assert {index for index in started_on_worker if remote[index].node == nodes["head"]}, "nothing was retried"
    assert_same_figures(run_local_one_thread(chunks, {**shared, "started": ""}), remote)


@pytest.mark.ray
@pytest.mark.integration
def test_the_scale_out_benchmark_runs_on_a_given_cluster(cluster):
    from benchmarks import scale_out

    two_nodes(cluster)
    result = scale_out.run(2, 1, 1, 512, 1, cluster.address, None)
    assert set(result["seconds"]) == {"local", "ray"} and all(len(times) == 1 for times in result["seconds"].values())
    assert result["ratio_ray_vs_local"] == pytest.approx(
        result["models_per_s"]["ray"] / result["models_per_s"]["local"], rel=0.01, abs=0.001
    )  # both kept to 3 decimals
    assert result["cluster"] == cluster.address


@pytest.mark.ray
@pytest.mark.integration
def test_the_init_scale_study_runs_its_chunks_on_both_nodes_with_the_local_figures(cluster):
    """The default pipeline's study through the same executor: `executor: ray` in its section, chunks spread
    over the nodes, every model's figures those of the local run (1 thread, as a 1-CPU task has)."""
    import dataclasses

    from pipeline.stages import init_scale
    from tests.conftest import make_split
    from tests.test_init_scale import study, train_params

    def flat(split):
        images, labels = split
        return images.reshape(len(images), -1).float() / 255, labels.long()

    nodes = two_nodes(cluster)
    data = {"train": flat(make_split(256, seed=5)), "validation": flat(make_split(64, seed=6))}
    params = study(epochs=2, report_epochs=(2,), sharpness_epochs=(0,), chunk_models=2)
    remote = init_scale.train(
        dataclasses.replace(params, executor="ray", ray_address=cluster.address), train_params(), data
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = init_scale.train(params, train_params(), data)
    finally:
        torch.set_num_threads(previous)
    assert set(remote.nodes) == set(nodes.values()) and set(local.nodes) == {"local"}
    assert remote.models == local.models
    for want, got in zip(local.histories, remote.histories):
        for expected, actual in zip(want, got):
            for name in ("train_loss", "validation_accuracy", "loss", "w1_travel", "sharpness"):
                assert actual[name] == (
                    None if expected[name] is None else pytest.approx(expected[name], rel=TOLERANCE, abs=TOLERANCE)
                ), name
