"""The entry every stage shares: one-line errors, signals held while the store is busy, out of memory in one line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.stages import prepare
from tests.conftest import REPO, run_tool, tiny_params, tool_env, under_ulimit


@pytest.fixture(autouse=True)
def default_handlers():
    """stage_entry installs its handlers for the process: give pytest its own back after each test."""
    saved = {signum: signal.getsignal(signum) for signum in cli.HELD}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_pipeline_error_is_one_line_and_exit_2(capsys):
    @cli.stage_entry
    def main():
        raise PipelineError("train.epochs: got 'ten', expected an integer")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: train.epochs: got 'ten', expected an integer\n"


def test_an_interrupt_is_exit_130(capsys):
    @cli.stage_entry
    def main():
        raise KeyboardInterrupt("signal SIGTERM")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted: signal SIGTERM\n"


def test_a_stage_process_freezes_and_spaces_its_collections_and_an_in_process_call_does_not(capsys):
    """Run as a process (its main in __main__), a stage freezes what its imports made, collects less often, and
    freezes everything on the way out (the interpreter's last collection is skipped). Called in-process, as tests
    do, the collector is left as it was."""
    import gc

    script = (
        "import atexit, gc\n"
        "from pipeline.cli import stage_entry\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
        "@stage_entry\n"
        "def main():\n"
        "    print('frozen', gc.get_freeze_count(), 'thresholds', gc.get_threshold())\n"
        "    global made\n"
        "    made = [[] for _ in range(1000)]\n"
        "main()\n"
    )
    first, last = run_tool([sys.executable, "-c", script], REPO, timeout=60).stdout.splitlines()
    assert first.endswith(f" thresholds {cli.COLLECT_EVERY}")
    at_start, at_exit = int(first.split()[1]), int(last.split()[1])
    assert at_start > 0 and at_exit >= at_start + 1000  # what main() made was frozen too, on the way out

    @cli.stage_entry
    def main():
        return "ran"

    before = gc.get_freeze_count(), gc.get_threshold()
    assert main() == "ran" and (gc.get_freeze_count(), gc.get_threshold()) == before


def interrupted_steps(hold, capsys, target: threading.Thread | None = None) -> list[str]:
    """Run a stage whose main sends SIGTERM to `target` (the main thread unless given) inside `hold()`; return the
    steps it got through. The signal goes to one chosen thread, not to the process: the kernel hands a process's
    signal to any thread that does not block it, and a test process holds threads of earlier tests, so which thread
    takes it would be chance."""
    steps = []

    @cli.stage_entry
    def main():
        with hold():
            signal.pthread_kill((target or threading.main_thread()).ident, signal.SIGTERM)
            # A signal another thread takes reaches the main thread's handler at its next bytecode boundary: wait
            # for it, boundedly. An unheld signal is raised during this wait.
            deadline = time.monotonic() + 5
            while not cli.interrupt_pending() and time.monotonic() < deadline:
                time.sleep(0.001)
            steps.append(f"held to the end, pending {cli.interrupt_pending()}")
        steps.append("after the block")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert (exit_info.value.code, capsys.readouterr().err) == (130, "interrupted: signal SIGTERM\n")
    return steps


def test_a_signal_inside_signals_held_is_raised_when_the_block_ends(capsys):
    assert interrupted_steps(cli.signals_held, capsys) == ["held to the end, pending True"]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # unblocked again
    assert not cli.interrupt_pending()


def test_a_signal_outside_signals_held_is_raised_at_once(capsys):
    from contextlib import nullcontext

    assert interrupted_steps(nullcontext, capsys) == []


def test_a_signal_another_thread_takes_still_waits(capsys):
    """The kernel may hand a process's signal to any thread that does not block it (torch and MLflow start
    threads); Python then runs the handler in the main thread, which must still wait."""
    done = threading.Event()
    other = threading.Thread(target=done.wait, daemon=True)
    other.start()  # before the block: it does not block SIGTERM
    try:
        assert interrupted_steps(cli.signals_held, capsys, target=other) == ["held to the end, pending True"]
    finally:
        done.set()


def test_nested_blocks_deliver_at_the_end_of_the_outermost(capsys):
    from contextlib import contextmanager

    @contextmanager
    def nested():
        with cli.signals_held(), cli.signals_held():
            yield
        with cli.signals_held():
            assert cli.interrupt_pending()  # still waiting after the inner block ended

    assert interrupted_steps(nested, capsys) == ["held to the end, pending True"]


def test_signals_held_outside_the_main_thread_is_a_no_op():
    errors = []

    def hold():
        try:
            with cli.signals_held():
                pass
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=hold)
    thread.start()
    thread.join()
    assert errors == [] and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


# --- out of memory ---


def allocate_too_much_with_torch():
    return torch.empty(2**60, dtype=torch.uint8)  # refused by the allocator (more than any machine has)


def allocate_too_much_with_python():
    return bytearray(2**62)


def oom_line(allocate, capsys) -> str:
    @cli.stage_entry
    def main():
        allocate()

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_torch_out_of_memory_is_one_line_naming_the_stage_the_code_and_the_amount(capsys):
    line = oom_line(allocate_too_much_with_torch, capsys)
    where = f"tests/test_cli.py:{allocate_too_much_with_torch.__code__.co_firstlineno + 1}"
    assert line == (
        f"error: test_cli: out of memory in {where} in allocate_too_much_with_torch: "
        "tried to allocate 1,152,921,504,606,846,976 bytes\n"
    )


def test_memory_error_is_one_line_even_without_an_amount(capsys):
    line = oom_line(allocate_too_much_with_python, capsys)
    assert re.fullmatch(
        r"error: test_cli: out of memory in tests/test_cli\.py:\d+ in allocate_too_much_with_python: "
        r"tried to allocate an unknown amount\n",
        line,
    )


@pytest.mark.parametrize(
    ("message", "amount"),
    [
        ("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)", "20.00 MiB"),
        ("MPS backend out of memory (MPS allocated: 1.2 GB). Tried to allocate 256 MB on private pool", "256 MB"),
    ],
)
def test_an_accelerators_out_of_memory_names_its_amount(message, amount):
    error = torch.OutOfMemoryError(message)
    assert cli.out_of_memory(error)
    assert cli.out_of_memory_line("train", error).endswith(f": tried to allocate {amount}")


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    @cli.stage_entry
    def main():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main()


VM_PROBE = """
import torch
import pipeline.stages.prepare
from pipeline import tracking

with tracking.stage_run("probe", "d2l-mlp"):  # creates the store: the stage then only opens it
    pass
torch.ones(1000, 1000).sum()
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmPeak")))
"""


@pytest.mark.integration
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_the_prepare_stage_out_of_memory_under_ulimit_is_one_line_and_writes_nothing(tmp_path, tiny_dataset):
    """The real stage, as dvc starts it, under `ulimit -v`: 300 MB above what the process needs before it reads
    the data, on a dataset whose preparation needs more (60000 blank images: 47 MB of bytes, 188 MB as floats,
    twice, and 376 MB as doubles for the statistics)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    count = 60_000  # the most a dataset without declared counts may hold
    dims = count.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (raw / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + dims + bytes(count * 784))
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + count.to_bytes(4, "big") + bytes(count))
    for kind in ("test_images", "test_labels"):
        (raw / prepare.FILE_KINDS[kind]).write_bytes(tiny_dataset["files"][kind])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny_params(tiny_dataset)(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    probe = subprocess.run([sys.executable, "-c", VM_PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    limit_kb = int(probe.stdout.split()[-1]) + 300_000
    out = tmp_path / "prepared"
    stage = [sys.executable, "-m", "pipeline.stages.prepare", "--params", str(tmp_path / "params.yaml")]
    stage += ["--raw", str(raw), "--out", str(out), "--stats", str(tmp_path / "stats.json")]
    result = run_tool(under_ulimit("-v", limit_kb, stage), REPO, env, timeout=300, check=False)
    lines = [line for line in result.stderr.splitlines() if " INFO mlflow" not in line]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(
        r"error: prepare: out of memory in pipeline/[\w/]+\.py:\d+ in \w+: "
        r"tried to allocate ([\d,]+ bytes|an unknown amount)",
        lines[0],
    ), lines[0]
    assert not out.exists() and not (tmp_path / "stats.json").exists()  # nothing half-written
    assert not list(tmp_path.glob(".prepared*"))  # no temporary directory left behind
