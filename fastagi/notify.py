"""Webhooks on ban and unban (`[[notify.webhook]]`): a generic JSON message or a
Slack/Mattermost-compatible `{"text": ...}`, batched, retried, never in the way.

Driven by the store's event stream, the one the agents follow (a `ban` when a target's
ban end is set or lengthened, an `unban` when its last hold is lifted; a ban that simply
runs out sends nothing, its end was in the ban message). A webhook is not a firewall:
nothing here applies or changes a ban.

One sender per webhook per cluster: every `serve` or `agent` configured with a webhook
competes for its lease in Redis (keys.notify_lease); the holder reads the events after
the webhook's cursor (keys.notify_cursor), and moves the cursor once the receiver took
a message. Another process takes over within LEASE + RENEW seconds of the holder's
death (within RENEW of a clean stop: it gives the lease up) and resumes from the
cursor, so a message may come twice then (at least once), never be lost. Configuring
the same webhook on every PBX is therefore the safe way.

Per webhook, two tasks of the service's loop: the reader (lease, events into a bounded
queue: when full the oldest is dropped, counted, and the next message says how many)
and the sender (one message per `batch` window after the first event it carries; up to
`retries` retries with a doubling backoff on connection errors, timeouts, 429 and 5xx;
a batch still refused waits for the next window with the newer events). Each HTTP
exchange is bounded by `timeout` and runs on its own task, so a receiver that never
answers delays no FastAGI session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from fastagi.admin import printable
from fastagi.agent import BadEntry, parse_event
from fastagi.config import WebhookConfig
from fastagi.store import Store, StoreError, parse_event_id

log = logging.getLogger("fastagi.notify")

LEASE = 30.0  # seconds a sender's lease lasts without renewal (takeover time)
RENEW = 5.0  # seconds between renewals (and between tries of a process standing by)
KEEP_CURSOR = 7 * 86400.0  # a cursor unused this long is forgotten: start from now
READ_BLOCK_MS = 500  # a blocking read of the stream (a real Redis), as the agent's
POLL = 0.5  # seconds between reads of the embedded store, which cannot block
READ_COUNT = 1000  # events per read
BACKOFF_FIRST = 1.0  # seconds before the first retry, doubled each time, capped at batch
LISTED = 20  # events spelled out in a text message; the rest are counted
MAX_REASON = 64


class WebhookError(Exception):
    """The receiver did not take the message; `retry` False when trying again cannot help."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Event:
    """One ban or unban as the store wrote it, or a bulk change (`sync`: a blocklist
    feed placed `count` bans at once, without an event each; `target` is its source)."""

    id: str
    op: str
    target: str
    until: float  # unix s (Redis's clock); 0 for an unban or a sync
    reason: str
    pbx_id: str
    count: int = 0

    @property
    def time(self) -> float:
        """When it happened: the stream id's milliseconds (Redis's clock)."""
        return int(self.id.partition("-")[0]) / 1000.0


def hook_id(config: WebhookConfig) -> str:
    """The webhook's name in Redis: the same URL and format on every PBX share one lease
    and cursor, whatever each names it; a digest, since the URL may carry a token."""
    return hashlib.sha256(f"{config.format} {config.url}".encode()).hexdigest()[:16]


def where(url: str) -> str:
    """The receiver for log lines: scheme and host only (the path may be a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# -- the messages ---------------------------------------------------------------------


def _slack_escaped(text: str) -> str:
    """Slack and Mattermost read <...> as links and mentions (<!channel>): a reason is
    another host's text, so it is escaped as their docs ask."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _utc(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def message(fmt: str, events: list[Event], dropped: int, pbx_id: str) -> bytes:
    """One message for a batch: generic JSON, or Slack/Mattermost `{"text": ...}`."""
    if fmt == "generic":
        return json.dumps(
            {
                "source": "fastagi-screen",
                "sender": pbx_id,
                "dropped": dropped,
                "events": [_generic(e) for e in events],
            }
        ).encode()
    ops = collections.Counter(e.op for e in events)
    words = (("ban", "ban"), ("unban", "unban"), ("sync", "bulk change"))
    counts = [f"{ops[op]} {word}{'s' if ops[op] != 1 else ''}" for op, word in words if ops[op]]
    lines = [f"fastagi-screen: {', '.join(counts) or 'no events'}"]
    for e in events[:LISTED]:
        if e.op == "ban":
            lines.append(f"• ban {e.target} until {_utc(e.until)} ({e.reason}, by {e.pbx_id})")
        elif e.op == "unban":
            lines.append(f"• unban {e.target} (by {e.pbx_id})")
        else:
            lines.append(f"• {e.target}: {e.count} bans placed or renewed at once (not listed)")
    if len(events) > LISTED:
        lines.append(f"… and {len(events) - LISTED} more")
    if dropped:
        lines.append(
            f"({dropped} earlier events dropped: the receiver was away and the queue full)"
        )
    return json.dumps({"text": _slack_escaped("\n".join(lines))}).encode()


def _generic(e: Event) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "op": e.op,
        "target": e.target,
        "time": e.time,
        "until": e.until if e.op == "ban" else None,
        "reason": e.reason,
        "pbx_id": e.pbx_id,
    }
    if e.op == "sync":
        entry["count"] = e.count
    return entry


# -- HTTP -----------------------------------------------------------------------------


async def post(url: str, body: bytes, timeout: float) -> int:
    """POST `body` as JSON to `url` (HTTP/1.1, one connection); the status code. The
    whole exchange, TLS included, is bounded by `timeout`."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: fastagi-screen\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host,
                parts.port or (443 if tls else 80),
                ssl=ssl.create_default_context() if tls else None,
                server_hostname=host if tls else None,
            )
            writer.write(head + body)
            await writer.drain()
            status = await reader.readline()
    except TimeoutError:
        raise WebhookError(f"no answer within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as error:
        raise WebhookError(error.strerror or str(error) or type(error).__name__) from None
    finally:
        if writer is not None:
            writer.transport.abort()
    words = status.split()
    if len(words) < 2 or not words[0].startswith(b"HTTP/") or not words[1].isdigit():
        raise WebhookError(f"not an HTTP answer: {status[:40]!r}")
    return int(words[1])


# -- metrics ----------------------------------------------------------------------------


class NotifyMetrics:
    """Per webhook name: messages sent, failed attempts, events dropped, lease held."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.sent = Counter(
            "fastagi_notify_sent",
            "Webhook messages the receiver took (2xx)",
            ["webhook"],
            registry=r,
        )
        self.failed = Counter(
            "fastagi_notify_failed",
            "Webhook attempts that failed (connection, timeout, non-2xx), retries included",
            ["webhook"],
            registry=r,
        )
        self.dropped = Counter(
            "fastagi_notify_dropped",
            "Ban/unban events not sent, by reason (queue: full while the receiver was away; "
            "refused: a 4xx answer; malformed: not an event)",
            ["webhook", "reason"],
            registry=r,
        )
        self.sender = Gauge(
            "fastagi_notify_sender",
            "1 while this process holds the webhook's lease (sends for the cluster)",
            ["webhook"],
            registry=r,
        )


# -- one webhook -------------------------------------------------------------------------


class Webhook:
    """The reader and the sender of one `[[notify.webhook]]`."""

    def __init__(
        self,
        config: WebhookConfig,
        store: Store,
        metrics: NotifyMetrics,
        block_ms: int | None = READ_BLOCK_MS,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.block_ms = block_ms  # None: the store cannot block (embedded); poll
        self.hook = hook_id(config)
        self.token = f"{secrets.token_hex(8)}@{store.pbx_id}"  # `check` names the sender
        self.name = config.name
        self.queue: collections.deque[Event] = collections.deque()
        self.first_at = 0.0  # monotonic time the oldest queued event arrived
        self.dropped = 0  # dropped since the last message that said so
        self.leading = False
        self.read_from = "0-0"
        self._next_renew = 0.0
        self._queued = asyncio.Event()
        self._store_down = False
        self._full = False
        self._stopping = False

    async def run(self) -> None:
        """Until cancelled: the reader here, the sender beside it."""
        sender = asyncio.create_task(self._sender(), name=f"notify-{self.name}-send")
        try:
            await self._reader()
        finally:
            self.stop()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            if self.leading:  # another process takes over now, from the cursor
                self.leading = False
                with contextlib.suppress(StoreError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.store.notify_release(self.hook, self.token)

    # -- reading ------------------------------------------------------------------------

    def stop(self) -> None:
        """A flag as well as the tasks' cancel: redis-py can swallow a cancellation that
        races with its own I/O (a read, the cursor's update), and a loop would go on."""
        self._stopping = True
        self._queued.set()  # wakes the sender, which then sees the flag

    async def _reader(self) -> None:
        while not self._stopping:
            try:
                await self._lease()
                if not self.leading:
                    await asyncio.sleep(RENEW)
                    continue
                budget = (self.block_ms or 0) / 1000 + 5.0
                async with asyncio.timeout(budget):
                    events = await self.store.events_after(
                        self.read_from, block_ms=self.block_ms, count=READ_COUNT
                    )
                if self._store_down:
                    log.info("notify %s: the store answers again", self.name)
                    self._store_down = False
                self._take(events)
                if not events and self.block_ms is None:
                    await asyncio.sleep(POLL)
            except (StoreError, TimeoutError) as error:
                if not self._store_down:
                    log.warning("notify %s: %s; retrying", self.name, error or "store timeout")
                    self._store_down = True
                await asyncio.sleep(RENEW)
            except Exception as error:  # a bug must not end notifications in silence
                log.error("notify %s: %s: %s", self.name, type(error).__name__, error)
                await asyncio.sleep(RENEW)

    async def _lease(self) -> None:
        """Take or renew the lease when due; on taking it, resume after the cursor."""
        now = time.monotonic()
        if now < self._next_renew:
            return
        held = await self.store.notify_lease(self.hook, self.token, LEASE, KEEP_CURSOR)
        self._next_renew = now + RENEW
        if held and not self.leading:
            await self._resume()
        elif self.leading and not held:
            log.warning("notify %s: another process took the lease; standing by", self.name)
            self.queue.clear()
        self.leading = held
        self.metrics.sender.labels(self.name).set(1 if held else 0)

    async def _resume(self) -> None:
        cursor = await self.store.notify_cursor(self.hook)
        if cursor is None:  # first sender (or a week without one): from now on
            cursor = await self.store.last_event_id()
            await self.store.notify_advance(self.hook, self.token, cursor, KEEP_CURSOR)
        else:
            first = await self.store.first_event_id()
            trimmed = first is not None and parse_event_id(first) > parse_event_id(cursor)
            if trimmed and cursor != "0-0":
                log.warning(
                    "notify %s: events after %s were trimmed from the stream before they were sent",
                    self.name,
                    cursor,
                )
        self.read_from = cursor
        log.info("notify %s: sending to %s from this process", self.name, where(self.config.url))

    def _take(self, rows: list[tuple[str, dict[str, str]]]) -> None:
        for event_id, fields in rows:
            self.read_from = event_id
            pbx = printable(fields.get("pbx_id", "")[:MAX_REASON])
            count = fields.get("count", "")
            if fields.get("op") == "sync" and count.isascii() and count.isdigit():
                source = printable(fields.get("source", "")[:MAX_REASON])
                self._queue(Event(event_id, "sync", source, 0.0, "", pbx, int(count)))
                continue
            try:
                op, _, until = parse_event(fields)
            except BadEntry as error:  # another writer's entry: one line, counted
                log.warning("notify %s: skipped event %s: %s", self.name, event_id, error)
                self.metrics.dropped.labels(self.name, "malformed").inc()
                continue
            reason = printable(fields.get("reason", "")[:MAX_REASON])  # no forged text lines
            self._queue(Event(event_id, op, fields["ip"], until, reason, pbx))

    def _queue(self, event: Event) -> None:
        if not self.queue:
            self.first_at = time.monotonic()
        self.queue.append(event)
        self._bound()
        self._queued.set()

    def _bound(self) -> None:
        """At most `queue` events wait: the oldest go first, counted, said once a spell."""
        while len(self.queue) > self.config.queue:
            self.queue.popleft()
            self.dropped += 1
            self.metrics.dropped.labels(self.name, "queue").inc()
            if not self._full:
                log.warning(
                    "notify %s: %d events waiting: dropping the oldest until %s answers",
                    self.name,
                    self.config.queue,
                    where(self.config.url),
                )
                self._full = True

    # -- sending ------------------------------------------------------------------------

    async def _sender(self) -> None:
        while not self._stopping:
            await self._queued.wait()
            wait = self.first_at + self.config.batch - time.monotonic()
            if wait > 0 and not self._stopping:
                await asyncio.sleep(wait)
            if not self.queue or not self.leading or self._stopping:
                self._queued.clear()
                continue
            batch, dropped = list(self.queue), self.dropped
            self.queue.clear()
            self._queued.clear()
            try:
                outcome = await self._deliver(batch, dropped)
            except Exception as error:  # a bug: keep the batch, say so, go on
                log.error("notify %s: %s: %s", self.name, type(error).__name__, error)
                outcome = "failed"
            if outcome == "sent":
                self.dropped -= dropped  # said in this message
                self._full = False
            if outcome != "failed":
                await self._advance(batch[-1].id)
            elif self.leading:
                self._requeue(batch)

    async def _deliver(self, batch: list[Event], dropped: int) -> str:
        """One message, retried: "sent", "refused" (for good: the batch is dropped,
        counted, so it never blocks the ones after it) or "failed" (try again later)."""
        body = message(self.config.format, batch, dropped, self.store.pbx_id)
        delay = BACKOFF_FIRST
        for attempt in range(self.config.retries + 1):
            try:
                status = await post(self.config.url, body, self.config.timeout)
                if 200 <= status < 300:
                    self.metrics.sent.labels(self.name).inc()
                    return "sent"
                retry = status == 429 or status >= 500
                raise WebhookError(f"HTTP {status}", retry)
            except WebhookError as error:
                self.metrics.failed.labels(self.name).inc()
                if not error.retry:
                    log.warning(
                        "notify %s: %s refused a message (%s): its %d events are dropped",
                        self.name,
                        where(self.config.url),
                        error,
                        len(batch),
                    )
                    self.metrics.dropped.labels(self.name, "refused").inc(len(batch))
                    return "refused"
                if attempt == self.config.retries:
                    log.warning(
                        "notify %s: %s: %s after %d tries; %d events wait for the next batch",
                        self.name,
                        where(self.config.url),
                        error,
                        attempt + 1,
                        len(batch),
                    )
                    return "failed"
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.batch)
        return "failed"

    def _requeue(self, batch: list[Event]) -> None:
        """A batch the receiver did not take goes back in front of the newer events; the
        next window carries them all (the bound still holds, oldest dropped first)."""
        self.queue.extendleft(reversed(batch))
        self.first_at = time.monotonic()
        self._bound()
        self._queued.set()

    async def _advance(self, event_id: str) -> None:
        try:
            if not await self.store.notify_advance(self.hook, self.token, event_id, KEEP_CURSOR):
                log.warning(
                    "notify %s: lease lost while sending; another process resumes", self.name
                )
        except StoreError as error:  # sent already: at worst a takeover sends it again
            log.warning("notify %s: cursor not saved: %s", self.name, error)


async def check_lines(hooks: tuple[WebhookConfig, ...], store: Store) -> list[str]:
    """`fastagi-ctl check`: each webhook, who sends it now and when its receiver last
    took an event (a warning when no process sends it)."""
    lines = []
    for hook in hooks:
        owner = await store.notify_owner(hook_id(hook))
        cursor = await store.notify_cursor(hook_id(hook))
        what = f"notify {hook.name}: {where(hook.url)} ({hook.format}, batch {hook.batch:g}s)"
        if owner is None:
            lines.append(f"warn {what}: no process sends it now (no serve or agent with it runs)")
            continue
        last = ""
        if cursor is not None and cursor != "0-0":
            age = max(0.0, store.now() - parse_event_id(cursor)[0] / 1000)
            last = f", last event taken {age:.0f}s ago"
        lines.append(f"ok   {what}: sent by {printable(owner.partition('@')[2])}{last}")
    return lines


class Notifier:
    """Every configured webhook of this process, as tasks of its loop."""

    def __init__(
        self,
        hooks: tuple[WebhookConfig, ...],
        store: Store,
        registry: CollectorRegistry | None = None,
        block_ms: int | None = READ_BLOCK_MS,
    ) -> None:
        metrics = NotifyMetrics(registry)
        self.webhooks = [Webhook(hook, store, metrics, block_ms) for hook in hooks]
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(hook.run(), name=f"notify-{hook.name}") for hook in self.webhooks
        ]

    async def stop(self) -> None:
        """Stop; what is still queued is sent by the next holder of the lease (the
        cursor has not moved past it)."""
        for hook in self.webhooks:
            hook.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
