"""Run a grid's chunks of models here, one after another, or as Ray tasks on an existing cluster: same answer.

A chunk is the unit of work: several models trained together by one call `function(chunk, shared)`, where
`shared` holds what every chunk reads (the prepared tensors). `local` runs the chunks in this process. `ray`
connects to a running cluster (it never starts one), puts `shared` once in the object store, runs one task per
chunk with `num_cpus` CPUs each (torch gets as many threads) and retries a task whose worker or node dies. The
`pipeline` package travels with the job (runtime_env py_modules), so workers need neither the repo, git nor the
MLflow store: they return figures, and the caller, which owns lineage, logs them. Ray is an optional extra
(`pip install .[ray]`): importing this module does not import it.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipeline.errors import PipelineError, first_line

C = TypeVar("C")  # a chunk: what one task trains
S = TypeVar("S")  # what every chunk shares
R = TypeVar("R")  # one chunk's figures

EXECUTORS = ("local", "ray")
LOCAL_NODE = "local"
CONNECT_TIMEOUT_S = 5.0  # ray.init retries an unreachable cluster for minutes; a TCP connect says so in seconds
PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ExecutorParams:
    """Where a grid's chunks run: `local` (this process) or `ray` (tasks on the cluster at `ray_address`)."""

    executor: str = "local"
    ray_address: str = "auto"  # "auto" (RAY_ADDRESS, or the cluster `ray start` made on this machine) or host:port
    num_cpus: float = 1  # per task; torch threads in the task = this, rounded down, at least 1
    max_retries: int = 3  # a task is retried when its worker or node dies


@dataclass(frozen=True)
class ChunkResult(Generic[R]):
    """One chunk's figures and the Ray node id that computed them ("local" for the local executor)."""

    value: R
    node: str


def run_chunks(
    function: Callable[[C, S], R],
    chunks: Sequence[C],
    shared: S,
    settings: ExecutorParams,
    on_result: Callable[[int, ChunkResult[R]], None] | None = None,
) -> list[ChunkResult[R]]:
    """`function(chunk, shared)` for every chunk, results in chunk order; `on_result(index, result)` as each ends."""
    check(settings)
    if settings.executor == "local":
        return _run_local(function, chunks, shared, on_result)
    return _run_ray(function, chunks, shared, settings, on_result)


def check(settings: ExecutorParams) -> None:
    """Reject settings no executor can use, naming the key, before anything runs."""
    if settings.executor not in EXECUTORS:
        raise PipelineError(f"executor: got {settings.executor!r}, expected one of {', '.join(EXECUTORS)}")
    if not settings.num_cpus > 0:
        raise PipelineError(f"num_cpus: got {settings.num_cpus!r}, expected a number above 0")
    if settings.max_retries < 0:
        raise PipelineError(f"max_retries: got {settings.max_retries!r}, expected 0 or more")


def _run_local(function, chunks, shared, on_result) -> list[ChunkResult]:
    results = []
    for index, chunk in enumerate(chunks):
        results.append(ChunkResult(function(chunk, shared), LOCAL_NODE))
        if on_result is not None:
            on_result(index, results[-1])
    return results


def _run_ray(function, chunks, shared, settings: ExecutorParams, on_result) -> list[ChunkResult]:
    ray = _import_ray()
    _connect(ray, settings.ray_address)
    try:
        shared_ref = ray.put(shared)  # once; a task gets it from the object store of its node
        task = ray.remote(num_cpus=settings.num_cpus, max_retries=settings.max_retries, scheduling_strategy="SPREAD")(
            _run_task
        )
        threads = max(1, int(settings.num_cpus))
        pending = {task.remote(function, chunk, shared_ref, threads): index for index, chunk in enumerate(chunks)}
        return _gather(ray, pending, len(chunks), on_result)
    finally:
        ray.shutdown()  # ends the job: its tasks still running are cancelled with it


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PipelineError("executor ray: Ray is not installed; install the extra: pip install '.[ray]'") from None
    return ray


def _connect(ray: Any, address: str) -> None:
    """ray.init on the existing cluster at `address`, after a bounded check that it answers at all."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise PipelineError(f"ray_address {address!r}: no Ray cluster answers at {host}:{port} ({error})") from None
    handlers = _signal_handlers()
    try:
        ray.init(
            address=f"{host}:{port}",
            runtime_env={"py_modules": [str(PACKAGE)]},  # a directory: shipped as the importable `pipeline`
            log_to_driver=False,  # the caller prints one line per fact; task errors come back as exceptions
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise PipelineError(f"ray_address {address!r}: cannot join the Ray cluster: {first_line(error)}") from None
    finally:  # ray.init makes SIGTERM a bare sys.exit; the stage's own handler ends its MLflow runs as KILLED
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _signal_handlers() -> dict:
    """SIGINT's and SIGTERM's handlers now (none to keep outside the main thread, where they cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}


def _host_port(address: str) -> tuple[str, int]:
    """host:port as given, or for "auto" what ray.init itself would resolve (RAY_ADDRESS, then this machine's)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as error:
            raise PipelineError(f"ray_address 'auto': {first_line(error)}") from None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"ray_address: got {address!r}, expected auto or host:port")
    return host.strip("[]"), int(port)


def _run_task(function: Callable, chunk: Any, shared: Any, threads: int) -> tuple[Any, str]:
    """The body of every Ray task: the chunk with torch on `threads` threads, and the node that ran it."""
    import ray
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(chunk, shared), ray.get_runtime_context().get_node_id()
    finally:
        torch.set_num_threads(previous)  # the worker process runs the job's next task too


def _gather(ray: Any, pending: dict, count: int, on_result) -> list[ChunkResult]:
    """Results in chunk order, reported as they complete; a chunk that failed for good is one line naming it."""
    results: list[ChunkResult | None] = [None] * count
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done)
        try:
            value, node = ray.get(done)
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the function's own exception
            raise PipelineError(
                f"chunk {index} of {count} failed ({type(cause).__name__}, retries exhausted or not retriable): "
                f"{first_line(cause)}"
            ) from None
        results[index] = ChunkResult(value, node)
        if on_result is not None:
            on_result(index, results[index])
    return results
