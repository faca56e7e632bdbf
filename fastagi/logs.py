"""The long-running commands' log: one line per screened call, so each line must be cheap.

With logging's defaults a line cost ~10% of a session's CPU in bench/ (a strftime per
record, a write() and a flush per line). Here the date and time text is made once a
second, and INFO lines leave in batches, at most FLUSH_AFTER late; warnings and errors
at once. The text is the same as `logging.basicConfig(format=FORMAT)` gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BUFFER = 1 << 16  # bytes; the buffered lines go out when this fills, if not sooner
FLUSH_AFTER = 0.05  # seconds an INFO line may wait for the lines that follow it


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


class BatchingHandler(logging.StreamHandler):
    """Lets INFO lines wait up to FLUSH_AFTER in the buffer, so one write() carries many;
    a WARNING or worse goes out at once, with every line before it.

    Outside a running loop (another thread, startup, exit) every line goes out at once,
    and `flush()` (logging.shutdown at exit) always writes what is left."""

    def __init__(self, stream: io.TextIOBase) -> None:
        super().__init__(stream)
        self._due_on: asyncio.AbstractEventLoop | None = None  # loop with a flush pending

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            loop = None if record.levelno >= logging.WARNING else _running_loop()
            if loop is None:
                self.flush()
            elif self._due_on is not loop:  # a loop that closed with one pending is replaced
                self._due_on = loop
                loop.call_later(FLUSH_AFTER, self._flush_due)
        except Exception:
            self.handleError(record)

    def _flush_due(self) -> None:
        self._due_on = None
        with contextlib.suppress(OSError, ValueError):  # stderr is gone: nowhere to say so
            self.flush()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def setup(level: str) -> None:
    """Log to stderr at `level`, through a buffer of our own: Python keeps sys.stderr
    line-buffered, one write() per line."""
    # Skip what FORMAT never shows (caller's file and line, thread and process names).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: no caller lookup per record
    stream: io.TextIOBase
    try:
        stream = open(  # noqa: SIM115 - lives as long as the process, flushed at exit
            sys.stderr.fileno(),
            "w",
            buffering=BUFFER,
            encoding=sys.stderr.encoding,
            errors="backslashreplace",
            closefd=False,
        )
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor
        stream = sys.stderr
    handler = BatchingHandler(stream)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
