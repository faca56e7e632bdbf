"""The long-running commands' log: one line per screened call, and never a wait for it.

With logging's defaults a line cost ~10% of a session's CPU in bench/ (a strftime per
record, a write() and a flush per line), and a write() to a stderr nobody reads (a
stuck journald, a pager left open) blocked the event loop: every session hung and
SIGTERM went unanswered. So the loop only formats a line and queues it; a writer
thread writes the queue out. INFO lines wait up to FLUSH_AFTER so that one write()
carries many; a WARNING or worse wakes the writer at once, after every line before it.
The queue is bounded: when the writer cannot keep up, INFO lines are dropped first
(warnings have WARNING_RESERVE lines more), counted (`dropped_lines()`, in /metrics),
and one line says how many when writing resumes. The text is the same as
`logging.basicConfig(format=FORMAT)` gives.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import sys
import threading
import time
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_AFTER = 0.05  # seconds an INFO line may wait for the lines that follow it
MAX_PENDING = 10_000  # lines waiting to be written; more INFO lines are dropped
WARNING_RESERVE = 1_000  # room kept for warnings and errors beyond MAX_PENDING
EXIT_WAIT = 1.0  # seconds the exit waits for the writer: a stuck stderr must not hold it


class LineFormatter(logging.Formatter):
    """FORMAT, with `%(asctime)s` (`2026-11-25 06:17:02,082`) built from a per-second cache."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads read it whole

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float | None = None) -> str:
        """`%(asctime)s` of a record made at `created` (its msecs as LogRecord sets them)."""
        second = int(created)
        cached, stamp = self._second
        if cached != second:
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, stamp)
        if msecs is None:
            msecs = int((created - second) * 1000)
        return self.default_msec_format % (stamp, msecs)


class QueuedHandler(logging.Handler):
    """Formats on the caller's thread, writes on a thread of its own; see the module text.

    Writes go to `fd` with os.write() when there is one (no Python buffer a blocked
    writer could hold locked at exit), else to `stream`."""

    def __init__(
        self,
        fd: int | None = None,
        stream: TextIO | None = None,
        encoding: str = "utf-8",
        limit: int = MAX_PENDING,
    ) -> None:
        super().__init__()
        self._fd, self._stream, self._encoding = fd, stream, encoding
        self.limit = limit
        self._lines: collections.deque[str] = collections.deque()
        self._dropped = 0  # lines dropped with the queue full (emit's, under self.lock)
        self._lost = 0  # lines a failed write took (the writer thread's own)
        self._unreported = 0  # dropped since the last summary line
        self._wake = threading.Event()  # lines are waiting
        self._wake_set = False  # _wake was set since the writer last took it (one set a batch)
        self._now = threading.Event()  # write without waiting: a warning, flush, close
        self._busy = False  # the writer holds lines it has not written yet
        self._closing = False
        self._stuck = False  # the last flush gave up waiting: the writer is blocked
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        # Called under self.lock (Handler.handle): the counters need no lock of their own.
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._queue(line, record.levelno >= logging.WARNING)

    def info_line(self, formatter: LineFormatter, name: str, text: str) -> None:
        """Queue `text` as logger `name`'s INFO line, as `formatter` would format it,
        without a LogRecord (see `info`)."""
        line = f"{formatter.stamp(time.time())} INFO {name}: {text}"
        assert self.lock is not None  # made by Handler.__init__
        with self.lock:
            self._queue(line, False)

    def _queue(self, line: str, urgent: bool) -> None:
        """Under self.lock: one formatted line into the queue, or counted as dropped."""
        if len(self._lines) >= self.limit + (WARNING_RESERVE if urgent else 0):
            self._dropped += 1
            self._unreported += 1
            return
        if self._unreported:
            self._lines.append(self._summary())
        self._lines.append(line)
        if urgent:
            self._now.set()
        if urgent or not self._wake_set:
            self._wake_set = True
            self._wake.set()

    @property
    def dropped(self) -> int:
        """Lines not written: dropped with the queue full, or lost to a failed write."""
        return self._dropped + self._lost

    def _summary(self) -> str:
        """The line that says how many lines were lost, where they were lost."""
        count, self._unreported = self._unreported, 0
        record = logging.LogRecord(
            "fastagi.logs",
            logging.WARNING,
            "",
            0,
            "%d log lines dropped: stderr did not keep up",
            (count,),
            None,
        )
        return self.format(record)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._wake_set = False  # before taking the lines: a later line sets it again
            if not self._now.is_set():
                self._now.wait(FLUSH_AFTER)
            self._now.clear()
            self._busy = True
            batch = []
            while self._lines:
                batch.append(self._lines.popleft())
            if batch:
                self._write("\n".join(batch) + "\n", len(batch))
            self._busy = False
            if self._closing and not self._lines:
                return

    def _write(self, text: str, count: int) -> None:
        try:
            if self._fd is None:
                assert self._stream is not None
                self._stream.write(text)
                self._stream.flush()
                return
            data = memoryview(text.encode(self._encoding, "backslashreplace"))
            while data:
                try:
                    data = data[os.write(self._fd, data) :]
                except BlockingIOError:  # a non-blocking stderr: this thread may wait
                    select.select([], [self._fd], [], 1.0)
        except (OSError, ValueError):  # stderr is gone: nowhere to say so
            self._lost += count

    def flush(self, timeout: float = EXIT_WAIT) -> None:
        """Write what is queued now; wait for it at most `timeout` seconds."""
        self._now.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._lines or self._busy:
            if time.monotonic() >= deadline:
                self._stuck = True
                return
            time.sleep(0.005)
        self._stuck = False

    def close(self, timeout: float = EXIT_WAIT) -> None:
        """At exit (logging.shutdown flushes, then closes): the last lines out, within
        one EXIT_WAIT in all; the writer thread is a daemon, so a stderr that never
        drains does not keep the process."""
        if self._unreported:
            self._lines.append(self._summary())
        self._closing = True
        self.flush(0 if self._stuck else timeout)
        super().close()


_handler: QueuedHandler | None = None


def dropped_lines() -> int:
    """Log lines this process could not write (for /metrics)."""
    return _handler.dropped if _handler is not None else 0


def info(logger: logging.Logger, text: str) -> None:
    """`logger.info("%s", text)` for a line logged once per screened call: the same
    line, a third of the cost (no LogRecord, no filters, no formatter), when it would
    reach setup()'s handler alone; through logging itself when anything else would see
    the record (a handler or filter added since, pytest's caplog)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _handler
    formatter = handler.formatter if handler is not None else None
    if isinstance(formatter, LineFormatter) and _reaches_only(logger, handler):
        handler.info_line(formatter, logger.name, text)
    else:
        logger.info("%s", text)


def _reaches_only(logger: logging.Logger, handler: logging.Handler) -> bool:
    """A record of `logger` meets no filter and no handler but `handler` (on the root)."""
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or (node.handlers and node.handlers != [handler]):
            return False
        if not node.propagate or node.parent is None:
            return node.handlers == [handler] and not handler.filters
        node = node.parent
    return False


def setup(level: str) -> None:
    """Log to stderr at `level` through a QueuedHandler."""
    global _handler
    # Skip what FORMAT never shows (caller's file and line, thread and process names).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: no caller lookup per record
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    try:
        handler = QueuedHandler(fd=sys.stderr.fileno(), encoding=encoding)
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor
        handler = QueuedHandler(stream=sys.stderr)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.captureWarnings(True)  # a Python warning would write to stderr itself, and block
    if handler in logging.getLogger().handlers:
        _handler = handler
    else:  # logging was set up already (basicConfig leaves it): this one stays unused
        handler.close()
