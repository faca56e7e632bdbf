"""Prometheus metrics for one service instance, served on `[metrics] listen`.

Two kinds of numbers:
- this server's own (sessions by route and result, durations, refusals, injection
  attempts, the store step's latency and Redis errors, bans issued by its verdicts),
  kept in a `CollectorRegistry` of this instance only, so tests can run several;
- the cluster's, read from the store at scrape time with the same queries as
  `fastagi-ctl status` (total calls, injection attempts, bans, currently banned and
  counted), so /metrics and `status` tell the same story.

The agent (or anything else applying bans to a firewall) reports through
`ban_applied`, `ban_lifted` and `firewall_size`, per pbx_id and backend; the
module-level functions of the same names reach the running service's instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fastagi import logs
from fastagi.screening import SCREEN_ROUTE, Outcome, StepObserver
from fastagi.server import Observer
from fastagi.store import STALE_BEATS, heartbeat_age

if TYPE_CHECKING:
    from fastagi.store import Store

log = logging.getLogger("fastagi.metrics")

ROUTES = (SCREEN_ROUTE,)  # anything else is labelled "unknown": route names are peer text
RESULTS = ("COUNTED", "BANNED", "IGNORED", "ERROR")
SESSION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
SCRAPE_BUDGET = 1.0  # seconds the cluster read may take inside one scrape
MAX_CONNECTIONS = 64  # open /metrics connections; a new one closes the oldest idle one
READ_TIMEOUT = 5.0  # seconds a /metrics client has to send its request (and to read)
MAX_REQUEST = 8192  # bytes of request head
# (metric, key of the store's stats hash, help): the totals `fastagi-ctl status` prints
CLUSTER_COUNTERS = (
    (
        "fastagi_cluster_calls",
        "calls",
        "Screened calls counted, cluster-wide (status: Total calls)",
    ),
    (
        "fastagi_cluster_injection_attempts",
        "injections",
        "Injection attempts, cluster-wide (status: Injection attempts)",
    ),
    (
        "fastagi_cluster_bans",
        "bans",
        "Bans, cluster-wide, manual and fail2ban ones included (status: Total banned)",
    ),
    ("fastagi_cluster_unbans", "unbans", "Bans lifted by unban, cluster-wide"),
    (
        "fastagi_cluster_auth_failures",
        "auth_failures",
        "Authentication failures counted from AMI security events, cluster-wide "
        "(status: Password guessing, Total failures)",
    ),
)

_active: Metrics | None = None


class Metrics(Observer, StepObserver):
    """The server's Observer and the screener's StepObserver, in one registry."""

    def __init__(self, store: Store | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Counter(
            "fastagi_sessions",
            "FastAGI sessions that ended, by route and SCREEN_RESULT "
            "(result 'none': ended without one, see fastagi_sessions_aborted_total)",
            ["route", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "fastagi_session_duration_seconds",
            "Time from accept to the last answer",
            ["route"],
            buckets=SESSION_BUCKETS,
            registry=r,
        )
        self.active = Gauge("fastagi_sessions_active", "Sessions in progress", registry=r)
        self.aborted = Counter(
            "fastagi_sessions_aborted",
            "Sessions that ended without a result, by why "
            "(timeout: session_timeout; protocol: bad or early-closed dialogue; connection)",
            ["reason"],
            registry=r,
        )
        self.refused_total = Counter(
            "fastagi_sessions_refused",
            "Connections not served: busy (max_sessions), client (not in allowed_clients), "
            "reset (by the peer before the session started), key (wrong or missing "
            "server.key in the AGI URL), idle (closed at max_sessions before sending its "
            "environment, to make room)",
            ["reason"],
            registry=r,
        )
        self.injections = Counter(
            "fastagi_injection_attempts",
            "Sessions with a forged environment line (not res_agi's layout) or stray "
            "lines before the resync answer (line feeds in caller ID or dialed number)",
            registry=r,
        )
        self.store_seconds = Histogram(
            "fastagi_store_step_seconds",
            "Latency of the one Redis step per screened call",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            "fastagi_redis_errors",
            "Store steps that failed (error) or exceeded the "
            "Redis budget (timeout); the call got SCREEN_RESULT=ERROR, SCREEN_COUNTED=unknown "
            "(its NOTICE line is logged)",
            ["kind"],
            registry=r,
        )
        self.bans_issued = Counter(
            "fastagi_bans_issued",
            "Bans issued by this server's verdicts (a call that reached the threshold here)",
            registry=r,
        )
        self.fw_applied = Counter(
            "fastagi_firewall_bans_applied",
            "Bans put into a firewall by the agent",
            ["pbx_id", "backend"],
            registry=r,
        )
        self.fw_lifted = Counter(
            "fastagi_firewall_bans_lifted",
            "Bans removed from a firewall by the agent (expiry or unban)",
            ["pbx_id", "backend"],
            registry=r,
        )
        self.protected_calls = Counter(
            "fastagi_calls_protected",
            "Calls not counted because the caller's address is protected (a spoofed "
            "source, or our own infrastructure): SCREEN_RESULT=IGNORED, SCREEN_REASON=protected",
            registry=r,
        )
        self.fw_size = Gauge(
            "fastagi_firewall_set_size",
            "Addresses currently in the firewall set/chain",
            ["pbx_id", "backend"],
            registry=r,
        )
        self.skipped = Counter(
            "fastagi_agent_entries_skipped",
            "Events and ban-list entries the agent left out, each counted once, by reason "
            "(malformed, ignored, ...)",
            ["pbx_id", "reason"],
            registry=r,
        )
        self.country_calls = Counter(
            "fastagi_country_calls",
            "Screened calls by the caller's country (screening.geoip_db; 'unknown': not in "
            "the database) and whether the call made a ban (banned: 'yes' or 'no'); "
            "two-letter codes only, so at most a few hundred series",
            ["country", "banned"],
            registry=r,
        )
        self.feed_entries = Gauge(
            "fastagi_feed_entries",
            "Entries of each blocklist feed held by its last refresh (feeds.py)",
            ["feed"],
            registry=r,
        )
        self.feed_skipped = Counter(
            "fastagi_feed_entries_skipped",
            "Feed entries not held, by feed and why (protected, junk, too wide, duplicate, "
            "comment, blank)",
            ["feed", "reason"],
            registry=r,
        )
        self.feed_failures = Counter(
            "fastagi_feed_failures",
            "Feed refreshes that failed (the last good list stays held until it ends)",
            ["feed"],
            registry=r,
        )
        self.agent_restarts = Counter(
            "fastagi_agent_restarts",
            "Times the agent task ended with an error and was started again",
            ["pbx_id"],
            registry=r,
        )
        # Label children looked up once, not per session.
        self._sessions = {
            (route, result): self.sessions.labels(route, result)
            for route in (*ROUTES, "unknown")
            for result in (*RESULTS, "none")
        }
        self._durations = {route: self.duration.labels(route) for route in (*ROUTES, "unknown")}
        for reason in ("busy", "client", "reset", "key", "idle"):
            self.refused_total.labels(reason)
        for reason in ("timeout", "protocol", "connection"):
            self.aborted.labels(reason)
        for kind in ("error", "timeout"):
            self.redis_errors.labels(kind)
        self._routes = {route: route for route in ROUTES}
        self._http: MetricsEndpoint | None = None
        self.registry.register(LogCollector())
        if store is not None:
            self.registry.register(ClusterCollector(store, asyncio.get_running_loop()))

    # -- Observer (server.py) ------------------------------------------------------

    def session_started(self) -> None:
        self.active.inc()

    def session_done(
        self,
        route: str,
        outcome: Outcome | None,
        seconds: float,
        injected: bool = False,
        ended: str = "",
    ) -> None:
        self.active.dec()
        if ended == "refused":
            return  # counted by `refused`: not a session
        route = self._routes.get(route, "unknown")
        result = outcome.result if outcome is not None else "none"
        counter = self._sessions.get((route, result))
        (counter or self.sessions.labels(route, result)).inc()
        self._durations[route].observe(seconds)
        if injected:
            self.injections.inc()
        if ended:
            self.aborted.labels(ended).inc()
        if outcome is not None and outcome.new_ban:
            self.bans_issued.inc()
        if outcome is not None and outcome.reason == "protected":
            self.protected_calls.inc()
        if outcome is not None and outcome.country is not None:
            banned = "yes" if outcome.new_ban else "no"
            self.country_calls.labels(outcome.country or "unknown", banned).inc()

    def refused(self, why: str) -> None:
        self.refused_total.labels(why).inc()

    # -- StepObserver (screening.py) -------------------------------------------------

    def store_step(self, seconds: float, error: str = "") -> None:
        if error:
            self.redis_errors.labels(error).inc()
        else:
            self.store_seconds.observe(seconds)

    # -- hooks for the agent ---------------------------------------------------------

    def ban_applied(self, pbx_id: str, backend: str, count: int = 1) -> None:
        self.fw_applied.labels(pbx_id, backend).inc(count)

    def ban_lifted(self, pbx_id: str, backend: str, count: int = 1) -> None:
        self.fw_lifted.labels(pbx_id, backend).inc(count)

    def firewall_size(self, pbx_id: str, backend: str, size: int) -> None:
        self.fw_size.labels(pbx_id, backend).set(size)

    def entry_skipped(self, pbx_id: str, reason: str) -> None:
        self.skipped.labels(pbx_id, reason).inc()

    def agent_restarted(self, pbx_id: str) -> None:
        self.agent_restarts.labels(pbx_id).inc()

    # -- hooks for the feeds (feeds.py) ---------------------------------------------------

    def feed_refreshed(self, feed: str, entries: int, skipped: Mapping[str, int]) -> None:
        self.feed_entries.labels(feed).set(entries)
        for reason, count in skipped.items():
            self.feed_skipped.labels(feed, reason).inc(count)

    def feed_failed(self, feed: str) -> None:
        self.feed_failures.labels(feed).inc()

    # -- the endpoint ----------------------------------------------------------------

    async def serve(
        self, host: str, port: int, pages: Mapping[str, Page] | None = None
    ) -> tuple[str, int]:
        """Serve /metrics (and `pages`, path -> page) on this loop; returns the bound address."""
        global _active
        self._http = MetricsEndpoint(self.registry)
        self._http.pages.update(pages or {})
        where = await self._http.start(host, port)
        _active = self
        return where

    def close(self) -> None:
        global _active
        if self._http is not None:
            self._http.close()
            self._http = None
        if _active is self:
            _active = None


Page = Callable[[], Awaitable[tuple[str, bytes]]]
"""A read-only page served beside /metrics: returns (content type, body)."""


class PageError(Exception):
    """A page that cannot be served now (the store is away): a 503 with this message,
    never an empty 200 that a consumer would take for "nothing is banned"."""


class MetricsEndpoint:
    """A small HTTP server for scrapes, on the service's loop.

    prometheus-client's own server starts a thread per connection: 1,000 idle
    connections made 1,008 threads. Here a connection is a socket and a task; at most
    MAX_CONNECTIONS are open (a new one closes the oldest that is still idle, so a
    scraper always gets in), each must send its request within READ_TIMEOUT, and the
    registry is read on one thread of its own (the cluster numbers are read back on
    this loop, which must stay free meanwhile)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.pages: dict[str, Page] = {}  # path -> page; every other path is /metrics
        self._server: asyncio.Server | None = None
        self._idle: dict[asyncio.StreamWriter, None] = {}  # still reading, oldest first
        self._busy: set[asyncio.StreamWriter] = set()
        self._scraper = ThreadPoolExecutor(1, thread_name_prefix="metrics-scrape")

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=MAX_REQUEST, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[:2]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if len(self._idle) + len(self._busy) >= MAX_CONNECTIONS:
            if not self._idle:
                writer.transport.abort()
                return
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.transport.abort()
        self._idle[writer] = None
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            self._idle.pop(writer, None)
            self._busy.add(writer)
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0].decode("latin-1")
            page = self.pages.get(path)
            content_type = CONTENT_TYPE_LATEST
            if method not in (b"GET", b"HEAD"):
                status, body = b"405 Method Not Allowed", b"GET /metrics\n"
            elif page is not None:
                try:
                    content_type, body = await page()
                    status = b"200 OK"
                except PageError as error:
                    status, body = b"503 Service Unavailable", f"{error}\n".encode()
                    content_type = "text/plain; charset=utf-8"
            else:
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(self._scraper, generate_latest, self.registry)
                status = b"200 OK"
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % (status, content_type.encode(), len(body))
            )
            if method != b"HEAD":
                writer.write(body)
            async with asyncio.timeout(READ_TIMEOUT):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that sent no request in time, or went away: nothing to answer
        finally:
            self._idle.pop(writer, None)
            self._busy.discard(writer)
            writer.transport.abort()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in [*self._idle, *self._busy]:
            writer.transport.abort()
        self._scraper.shutdown(wait=False, cancel_futures=True)


class LogCollector(Collector):
    """Log lines this process dropped because stderr did not keep up (logs.py)."""

    def collect(self) -> Iterator:
        yield CounterMetricFamily(
            "fastagi_log_lines_dropped",
            "Log lines not written: stderr did not keep up (a stuck journald or pipe)",
            value=logs.dropped_lines(),
        )


class ClusterCollector(Collector):
    """Cluster-wide numbers, read at scrape time exactly as `fastagi-ctl status` reads them."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop

    async def _read(self) -> tuple[dict[str, int], int, int, dict[str, dict]]:
        store = self.store
        # Bounded here, in the loop: the service's client has no per-command timeout.
        async with asyncio.timeout(SCRAPE_BUDGET):
            await store.sync_clock()  # Redis's time: this host's clock may be off
            now_ms = store.now_ms()
            totals, banned, counted, agents = await asyncio.gather(
                store.totals(),
                store.redis.zcount(store.keys.banned, f"({now_ms}", "+inf"),
                store.redis.zcount(store.keys.counted, f"({now_ms}", "+inf"),
                store.agents(),
            )
        return totals, int(banned), int(counted), agents

    def collect(self) -> Iterator:
        up = GaugeMetricFamily("fastagi_store_up", "1 if the store answered this scrape")
        future = asyncio.run_coroutine_threadsafe(self._read(), self.loop)
        try:
            totals, banned, counted, agents = future.result(SCRAPE_BUDGET + 0.5)
        except (FutureTimeout, Exception) as error:
            future.cancel()  # a loop too busy to start it: it must not run later
            log.info("metrics: cluster numbers unavailable: %s", error or type(error).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, key, text in CLUSTER_COUNTERS:
            family = CounterMetricFamily(name, text)
            family.add_metric([], totals.get(key, 0))
            yield family
        yield GaugeMetricFamily(
            "fastagi_cluster_banned",
            "Addresses banned now (status: Currently banned)",
            value=banned,
        )
        yield GaugeMetricFamily(
            "fastagi_cluster_counted",
            "Addresses counted in their window now (status: Currently counted)",
            value=counted,
        )
        yield from _agent_families(agents, self.store.now())


def _agent_families(agents: dict[str, dict], now: float) -> Iterator:
    """Each agent's heartbeat age and whether it is stale (status: Agents seen)."""
    age = GaugeMetricFamily(
        "fastagi_agent_heartbeat_age_seconds",
        "Seconds since each agent's last heartbeat",
        labels=["pbx_id"],
    )
    stale = GaugeMetricFamily(
        "fastagi_agent_stale",
        f"1 if an agent's heartbeat is older than {STALE_BEATS} of its intervals "
        "(dead or stuck: its firewall no longer follows the ban list)",
        labels=["pbx_id"],
    )
    for pbx, info in sorted(agents.items()):
        seconds, late = heartbeat_age(info, now)
        age.add_metric([pbx], seconds)
        stale.add_metric([pbx], 1 if late else 0)
    yield age
    yield stale


async def start(
    config_listen: str, store: Store | None, pages: Mapping[str, Page] | None = None
) -> Metrics | None:
    """This service's metrics (and `pages`) served on `listen` ("host:port"); None when
    it is empty."""
    if not config_listen:
        return None
    metrics = Metrics(store)
    host, _, port = config_listen.rpartition(":")
    where = await metrics.serve(host.strip("[]") or "127.0.0.1", int(port), pages)
    log.info(
        "metrics on http://%s:%d/metrics%s",
        where[0],
        where[1],
        "".join(f", {path}" for path in sorted(pages or {})),
    )
    return metrics


def active() -> Metrics | None:
    """The running service's instance (the one serving /metrics), if any."""
    return _active


def ban_applied(pbx_id: str, backend: str, count: int = 1) -> None:
    if _active is not None:
        _active.ban_applied(pbx_id, backend, count)


def ban_lifted(pbx_id: str, backend: str, count: int = 1) -> None:
    if _active is not None:
        _active.ban_lifted(pbx_id, backend, count)


def firewall_size(pbx_id: str, backend: str, size: int) -> None:
    if _active is not None:
        _active.firewall_size(pbx_id, backend, size)


def entry_skipped(pbx_id: str, reason: str) -> None:
    if _active is not None:
        _active.entry_skipped(pbx_id, reason)


def agent_restarted(pbx_id: str) -> None:
    if _active is not None:
        _active.agent_restarted(pbx_id)
