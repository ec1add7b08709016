"""The entry every stage shares: one-line errors and signals that never cut an MLflow store call short."""

from __future__ import annotations

import signal
import sys

import pytest

from pipeline import cli
from pipeline.errors import PipelineError


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


def test_a_signal_inside_the_store_waits_until_the_store_code_has_returned(monkeypatch):
    store_module = {"__name__": "sqlalchemy.orm.session"}
    exec("import sys\ndef current_frame():\n    return sys._getframe()", store_module)
    timers = []
    monkeypatch.setattr(signal, "setitimer", lambda which, seconds: timers.append(seconds))
    monkeypatch.setattr(sys, "settrace", lambda function: None)  # the timer's path alone (the trace: below)
    monkeypatch.setattr(cli, "_pending", [])
    cli._interrupt(signal.SIGTERM, store_module["current_frame"]())  # deferred: no exception
    assert cli._pending == [signal.SIGTERM] and timers == [cli.RETRY_S]
    cli._retry_pending(signal.SIGALRM, store_module["current_frame"]())  # still inside: deferred again
    assert timers == [cli.RETRY_S] * 2
    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
        cli._retry_pending(signal.SIGALRM, sys._getframe())  # back in our code: raised now
    assert cli._pending == []
    cli._retry_pending(signal.SIGALRM, sys._getframe())  # nothing pending: nothing happens


def test_a_waiting_signal_is_delivered_at_the_first_line_its_callers_run(monkeypatch):
    """The timer alone can starve when SQLite's C calls take nearly all the time: once the store code has
    returned, the first line run by a frame below it delivers the signal."""
    store_module = {"__name__": "sqlalchemy.engine.base"}
    exec("import sys\ndef current_frame():\n    return sys._getframe()", store_module)
    monkeypatch.setattr(signal, "setitimer", lambda which, seconds: None)
    monkeypatch.setattr(cli, "_pending", [])
    called, store_frame = [], store_module["current_frame"]()  # a store frame whose caller is this test
    try:
        with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
            cli._interrupt(signal.SIGTERM, store_frame)  # deferred: the store frame's callers get a line tracer
            called.append("never runs")  # this test's next line delivers it
        assert called == [] and cli._pending == [] and sys.gettrace() is None
    finally:
        sys.settrace(None)
