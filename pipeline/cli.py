"""What every stage's main() shares: its command line, and an entry wrapper that turns errors, signals and running
out of memory into one line and an exit status."""

from __future__ import annotations

import argparse
import functools
import gc
import re
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")
DEFAULT_PARAMS = Path("params.yaml")
HELD = {signal.SIGINT, signal.SIGTERM}  # what signals_held() keeps waiting; SIGKILL cannot be held by anyone
_held = 0  # how many signals_held() blocks the main thread is in
_pending: list[int] = []  # signals that arrived while held, delivered when the outermost block ends
# A stage process's garbage collection thresholds (Python's are 700, 10, 10): the lazy imports of MLflow and
# matplotlib then trigger 3 full collections instead of 7, 0.3-0.6 s less per stage; cycles still go.
COLLECT_EVERY = (50_000, 20, 100)


def stage_parser(doc: str, params: Path = DEFAULT_PARAMS) -> argparse.ArgumentParser:
    """A stage's command line: the first line of its docstring, and where its params file is."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--params", type=Path, default=params)
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so open MLflow runs end KILLED and temporary files go; inside
    signals_held() they wait. (The mask keeps the main thread from taking them, but the kernel may hand a
    signal to another thread, torch's or MLflow's; Python then runs this handler in the main thread anyway.)"""
    if _held:
        _pending.append(signum)
        return
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for a short step that must not be cut short (a call into the MLflow store: an
    interrupt inside an SQLite transaction leaves the store locked); a signal that arrived meanwhile is raised,
    as KeyboardInterrupt, when the outermost block ends (with stage_entry's handlers, whichever thread the kernel
    hands the signal to). Only the main thread handles signals: elsewhere a no-op."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1  # first: a signal handled from here on waits
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a blocked signal is handled now, and waits
        _held -= 1
        if not _held and _pending:
            signum = _pending[0]
            _pending.clear()
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def interrupt_pending() -> bool:
    """Whether SIGINT or SIGTERM arrived during signals_held() and waits for its end (a run then ends KILLED)."""
    return bool(_pending) or bool(HELD & signal.sigpending())


# How the allocators say they ran out: torch's CPU allocator ("can't allocate memory: you tried to allocate N
# bytes"), CUDA and MPS ("out of memory. Tried to allocate 20.00 MiB"), NumPy ("Unable to allocate 1.2 GiB").
OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)
AMOUNT = re.compile(r"allocate (\d+ bytes|[\d.]+ ?[KMGTP]i?B)", re.IGNORECASE)


def out_of_memory(error: BaseException) -> bool:
    """MemoryError, or torch's RuntimeError (OutOfMemoryError included) for an allocation that failed."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and OUT_OF_MEMORY.search(str(error)) is not None


def out_of_memory_line(stage: str, error: BaseException) -> str:
    """One line for a stage that could not get memory: the stage, the code that was allocating, and how much."""
    where = _allocating_frame(error.__traceback__)
    found = AMOUNT.search(str(error))
    amount = found.group(1) if found else "an unknown amount"
    if found and found.group(1).endswith(" bytes"):
        amount = f"{int(found.group(1).split()[0]):,} bytes"
    return f"{stage}: out of memory in {where}: tried to allocate {amount}"


def _allocating_frame(traceback: TracebackType | None) -> str:
    """`file:line in function` of the innermost frame of our own code (not the standard library, not an installed
    package) where the allocation failed; the innermost frame when none is ours."""
    paths = sysconfig.get_paths()
    library = {Path(paths[key]).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    frames, own = [], []
    while traceback is not None:
        frames.append(traceback)
        file = Path(traceback.tb_frame.f_code.co_filename).resolve()
        if file.is_file() and not any(file.is_relative_to(path) for path in library):
            own.append(traceback)
        traceback = traceback.tb_next
    if not frames:
        return "an unknown place"
    chosen = (own or frames)[-1]
    return f"{_short(chosen.tb_frame.f_code.co_filename)}:{chosen.tb_lineno} in {chosen.tb_frame.f_code.co_name}"


def _short(file: str) -> str:
    """A path relative to the working directory when it lies under it (pipeline/stages/prepare.py)."""
    path = Path(file).resolve()
    return path.relative_to(Path.cwd()).as_posix() if path.is_relative_to(Path.cwd()) else file


def stage_name(main: Callable[..., object]) -> str:
    """The stage a main() belongs to: `prepare` for pipeline.stages.prepare, also when run as `python -m`."""
    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else main.__module__
    if name == "__main__":
        name = Path(sys.argv[0]).stem or "__main__"
    return name.rsplit(".", 1)[-1]


def stage_entry(main: Callable[[], T]) -> Callable[[], T]:
    """Wrap a stage's main(): PipelineError or running out of memory -> one line on stderr and exit 2; SIGINT and
    SIGTERM -> KeyboardInterrupt (held during signals_held()), one line and exit 130.

    In a stage process (main() in __main__; not when a test calls it) the garbage collector is frozen before
    main() and after it (gc.freeze: the objects alive move to a generation no collection walks), and collects
    less often (COLLECT_EVERY). torch, MLflow and SQLAlchemy make millions of objects that live until the
    process ends: each full collection, and the interpreter's own on the way out, walked them all, about a
    second per stage for nothing. Cyclic garbage is still collected; atexit handlers and the flushing of
    standard streams still run."""

    @functools.wraps(main)
    def wrapper() -> T:
        # SIGTERM (what `kill` and CI cancellations send) must unwind like SIGINT, so that
        # open MLflow runs are ended as KILLED and temporary files are removed.
        for signum in HELD:
            signal.signal(signum, _interrupt)
        process = main.__module__ == "__main__"  # a stage process, not a test calling main()
        if process:
            gc.freeze()  # what the stage's imports made lives as long as the process: later collections skip it
            gc.set_threshold(*COLLECT_EVERY)
        try:
            return main()
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as interrupt:
            print(f"interrupted: {interrupt or 'SIGINT'}", file=sys.stderr)
            raise SystemExit(130) from None
        except (MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            print(f"error: {out_of_memory_line(stage_name(main), error)}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            if process:
                gc.freeze()  # the interpreter's collection on the way out then skips everything

    return wrapper
