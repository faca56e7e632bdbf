"""The service's log lines: the same text as logging's defaults, fewer writes."""

from __future__ import annotations

import asyncio
import io
import logging

from fastagi.logs import FLUSH_AFTER, FORMAT, BatchingHandler, LineFormatter


class _CountingSink(io.RawIOBase):
    """A file that remembers each write() it got."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writes.append(bytes(data))
        return len(data)


def _handler() -> tuple[BatchingHandler, _CountingSink]:
    sink = _CountingSink()
    stream = io.TextIOWrapper(io.BufferedWriter(sink, 1 << 16), encoding="utf-8")
    handler = BatchingHandler(stream)
    handler.setFormatter(LineFormatter())
    return handler, sink


def _record(created: float, level: int = logging.INFO) -> logging.LogRecord:
    record = logging.LogRecord(
        "fastagi.screening", level, "", 0, "Ext. %s: %s", ("7001", "x"), None
    )
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


def test_lines_read_exactly_as_with_loggings_default_formatter_across_seconds():
    ours, default = LineFormatter(), logging.Formatter(FORMAT)
    for created in (1795587476.001, 1795587476.999, 1795587477.5, 1795587476.25, 1795591076.0):
        record = _record(created)
        assert ours.format(record) == default.format(record)


def test_info_lines_leave_together_and_a_warning_at_once_with_those_before_it():
    handler, sink = _handler()

    async def main():
        for n in range(5):
            handler.handle(_record(1795587476.0 + n))
        held = len(sink.writes)
        await asyncio.sleep(FLUSH_AFTER + 0.05)
        batched = list(sink.writes)
        handler.handle(_record(1795587481.0))
        handler.handle(_record(1795587482.0, level=logging.WARNING))
        return held, batched

    held, batched = asyncio.run(main())
    assert held == 0
    assert len(batched) == 1 and batched[0].decode().count("\n") == 5
    assert len(sink.writes) == 2
    assert [line.split()[2] for line in sink.writes[1].decode().splitlines()] == [
        "INFO",
        "WARNING",
    ]


def test_a_line_left_pending_by_a_closed_loop_goes_out_with_the_next_loop():
    handler, sink = _handler()

    async def one_line(created: float) -> None:
        handler.handle(_record(created))

    asyncio.run(one_line(1795587476.0))  # the loop closes before its flush is due
    assert sink.writes == []

    async def later():
        await one_line(1795587477.0)
        await asyncio.sleep(FLUSH_AFTER + 0.05)

    asyncio.run(later())
    assert b"".join(sink.writes).decode().count("\n") == 2


def test_outside_a_running_loop_each_line_is_written_at_once():
    handler, sink = _handler()
    handler.handle(_record(1795587476.0))
    assert len(sink.writes) == 1 and sink.writes[0].endswith(b"x\n")
