"""The service's log lines: the same text as logging's defaults, fewer writes."""

from __future__ import annotations

import asyncio
import io
import logging

from fastagi.logs import FORMAT, LineFormatter, TurnFlushingHandler


class _CountingSink(io.RawIOBase):
    """A file that remembers each write() it got."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writes.append(bytes(data))
        return len(data)


def _handler() -> tuple[TurnFlushingHandler, _CountingSink]:
    sink = _CountingSink()
    stream = io.TextIOWrapper(io.BufferedWriter(sink, 1 << 16), encoding="utf-8")
    handler = TurnFlushingHandler(stream)
    handler.setFormatter(LineFormatter())
    return handler, sink


def _record(created: float, message: str = "Ext. %s: %s") -> logging.LogRecord:
    record = logging.LogRecord(
        "fastagi.screening", logging.INFO, "", 0, message, ("7001", "x"), None
    )
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


def test_lines_read_exactly_as_with_loggings_default_formatter_across_seconds():
    ours, default = LineFormatter(), logging.Formatter(FORMAT)
    for created in (1795587476.001, 1795587476.999, 1795587477.5, 1795587476.25, 1795591076.0):
        record = _record(created)
        assert ours.format(record) == default.format(record)


def test_lines_of_one_loop_turn_leave_in_one_write_and_none_waits_longer():
    handler, sink = _handler()

    async def main():
        for n in range(5):
            handler.handle(_record(1795587476.0 + n))
        during = len(sink.writes)
        await asyncio.sleep(0)  # the end of this turn
        await asyncio.sleep(0)
        return during

    during = asyncio.run(main())
    assert during == 0
    assert len(sink.writes) == 1
    assert sink.writes[0].decode().count("\n") == 5


def test_outside_a_running_loop_each_line_is_written_at_once():
    handler, sink = _handler()
    handler.handle(_record(1795587476.0))
    assert len(sink.writes) == 1 and sink.writes[0].endswith(b"x\n")
