"""The long-running commands' log: one line per screened call, so each line must be cheap.

With logging's defaults a line cost ~10% of a session's CPU in bench/ (a strftime per
record, a write() and a flush per line). Here the date and time text is made once a
second, and the lines of one event-loop turn leave in one write. The text is the same
as `logging.basicConfig(format=FORMAT)` gives.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BUFFER = 1 << 16  # bytes; a turn's lines go out together, or sooner when this fills


class LineFormatter(logging.Formatter):
    """FORMAT, with `%(asctime)s` (`2026-11-25 06:17:02,082`) built from a per-second cache."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads read it whole

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached, stamp = self._second
        if cached != second:
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, stamp)
        return self.default_msec_format % (stamp, record.msecs)


class TurnFlushingHandler(logging.StreamHandler):
    """Buffers lines and flushes once per event-loop turn instead of once per line.

    Called outside a running loop (another thread, startup, exit) it flushes at once,
    as StreamHandler does; a line waits at most for the end of the current turn."""

    def __init__(self, stream: io.TextIOBase) -> None:
        super().__init__(stream)
        self._scheduled = False

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._scheduled = False
        super().flush()


def setup(level: str) -> None:
    """Log to stderr at `level`, through a buffer of our own: Python keeps sys.stderr
    line-buffered, one write() per line."""
    # Skip what FORMAT never shows (caller's file and line, thread and process names).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: no caller lookup per record
    stream = open(  # noqa: SIM115 - lives as long as the process, flushed at exit by logging
        sys.stderr.fileno(),
        "w",
        buffering=BUFFER,
        encoding=sys.stderr.encoding,
        errors="backslashreplace",
        closefd=False,
    )
    handler = TurnFlushingHandler(stream)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
