"""The service's log lines: the same text as logging's defaults, written off the loop."""

from __future__ import annotations

import logging
import threading

from fastagi import logs
from fastagi.logs import FORMAT, WARNING_RESERVE, LineFormatter, QueuedHandler


class _Sink:
    """A text stream that remembers what it got; `gate` cleared makes write() block,
    like a pipe whose reader stopped reading."""

    def __init__(self, fail: bool = False) -> None:
        self.text: list[str] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.gate.wait()
        if self.fail:
            raise OSError("stderr closed")
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return "".join(self.text).splitlines()


def _handler(sink: _Sink, limit: int = 100) -> QueuedHandler:
    handler = QueuedHandler(stream=sink, limit=limit)
    handler.setFormatter(LineFormatter())
    return handler


def _record(created: float, level: int = logging.INFO, text: str = "x") -> logging.LogRecord:
    record = logging.LogRecord(
        "fastagi.screening", level, "", 0, "Ext. %s: %s", ("7001", text), None
    )
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


def test_lines_read_exactly_as_with_loggings_default_formatter_across_seconds():
    ours, default = LineFormatter(), logging.Formatter(FORMAT)
    for created in (1795587476.001, 1795587476.999, 1795587477.5, 1795587476.25, 1795591076.0):
        record = _record(created)
        assert ours.format(record) == default.format(record)


def test_info_and_warning_lines_come_out_whole_and_in_order():
    sink = _Sink()
    handler = _handler(sink)
    levels = [logging.INFO] * 5 + [logging.WARNING, logging.INFO, logging.ERROR]
    for n, level in enumerate(levels):
        handler.handle(_record(1795587476.0 + n, level, f"line {n}"))
    handler.close()
    default = logging.Formatter(FORMAT)
    expected = [
        default.format(_record(1795587476.0 + n, lv, f"line {n}")) for n, lv in enumerate(levels)
    ]
    assert sink.lines() == expected


def test_a_blocked_stderr_never_blocks_the_logging_thread_and_drops_info_lines_first():
    sink = _Sink()
    handler = _handler(sink, limit=10)
    sink.gate.clear()
    handler.handle(_record(1795587476.0, text="first"))
    assert sink.entered.wait(5)  # the writer holds "first" and is stuck in write()
    for n in range(30):  # 10 wait in the queue, 20 are dropped: none of these blocks
        handler.handle(_record(1795587477.0, text=f"info {n}"))
    handler.handle(_record(1795587478.0, logging.WARNING, "kept"))
    for n in range(5):
        handler.handle(_record(1795587479.0, text=f"late {n}"))
    assert handler.dropped == 25
    sink.gate.set()  # the reader reads again
    handler.flush()
    handler.handle(_record(1795587480.0, text="resumed"))
    handler.close()
    messages = [line.split(": ", 1)[1] for line in sink.lines()]
    assert messages == [
        "Ext. 7001: first",
        *(f"Ext. 7001: info {n}" for n in range(10)),
        "20 log lines dropped: stderr did not keep up",
        "Ext. 7001: kept",
        "5 log lines dropped: stderr did not keep up",
        "Ext. 7001: resumed",
    ]
    assert "WARNING fastagi.logs: 20 log lines dropped" in sink.lines()[11]


def test_warnings_have_room_beyond_the_info_limit():
    sink = _Sink()
    handler = _handler(sink, limit=3)
    sink.gate.clear()
    handler.handle(_record(1795587476.0))
    assert sink.entered.wait(5)
    for _ in range(3 + 5):
        handler.handle(_record(1795587477.0))
    for _ in range(WARNING_RESERVE + 2):
        handler.handle(_record(1795587478.0, logging.ERROR))
    # 5 INFO beyond the limit, then 2 errors beyond the reserve (one slot went to the summary)
    assert handler.dropped == 5 + 3
    sink.gate.set()
    handler.close()


def test_exit_with_a_stuck_stderr_returns_after_its_bounded_wait():
    sink = _Sink()
    handler = _handler(sink)
    sink.gate.clear()
    handler.handle(_record(1795587476.0))
    assert sink.entered.wait(5)
    handler.handle(_record(1795587477.0))
    handler.flush(timeout=0.1)
    handler.close(timeout=0.1)  # returns: the writer thread stays stuck, a daemon
    assert sink.text == []
    sink.gate.set()


def test_lines_a_failing_stderr_could_not_take_are_counted():
    sink = _Sink(fail=True)
    handler = _handler(sink)
    for n in range(4):
        handler.handle(_record(1795587476.0 + n))
    handler.close()
    assert handler.dropped == 4


def test_dropped_lines_are_counted_in_metrics(monkeypatch):
    from prometheus_client import generate_latest

    from fastagi import logs
    from fastagi.metrics import Metrics

    sink = _Sink()
    handler = _handler(sink, limit=1)
    sink.gate.clear()
    handler.handle(_record(1795587476.0))
    assert sink.entered.wait(5)
    for _ in range(1 + 3):
        handler.handle(_record(1795587477.0))
    monkeypatch.setattr(logs, "_handler", handler)
    text = generate_latest(Metrics().registry).decode()
    sink.gate.set()
    handler.close()
    assert "fastagi_log_lines_dropped_total 3.0" in text


def _call_logger(handler: QueuedHandler, name: str) -> logging.Logger:
    """A logger whose records reach `handler` alone (pytest's own handlers sit on the root)."""
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_the_per_call_line_reads_exactly_as_loggings_and_anything_else_still_sees_it(monkeypatch):
    sink = _Sink()
    handler = _handler(sink)
    monkeypatch.setattr(logs, "_handler", handler)
    logger = _call_logger(handler, "fastagi.test-per-call")
    created = 1795587476.25
    monkeypatch.setattr(logs.time, "time", lambda: created)
    logs.info(logger, "Ext. 7001: x")  # the cheap way: straight into the queue
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(other)  # e.g. caplog: now the record must be made and handled
    logs.info(logger, "Ext. 7002: y")
    logger.setLevel(logging.WARNING)
    logs.info(logger, "Ext. 7003: z")  # below the level: nowhere
    logger.handlers.clear()
    handler.close()
    record = _record(created)
    record.name = "fastagi.test-per-call"
    expected = logging.Formatter(FORMAT).format(record)
    assert sink.lines()[0] == expected
    assert sink.lines()[1].endswith(" INFO fastagi.test-per-call: Ext. 7002: y")
    assert len(sink.lines()) == 2
    assert [r.getMessage() for r in seen] == ["Ext. 7002: y"]
