"""The FastAGI server: sockets, who may connect, how many at once, deadlines, routes.

One asyncio loop serves every session (measured against threads in bench/). Each
session ends within `session_timeout` whatever Asterisk, the caller or Redis does:
res_agi has no read timeout, so a server that waits holds the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastagi.access import key_matches
from fastagi.addresses import AddressError, AddressSet, parse_address
from fastagi.agi import (
    MAX_LINE,
    AGIProtocolError,
    AGISession,
    Environment,
    SessionStream,
)
from fastagi.quick import QuickSession, Steps
from fastagi.screening import SCREEN_ROUTE, Outcome, Screener, screen_variables

log = logging.getLogger("fastagi.server")

# Reserved at the end of every session to tell Asterisk the result.
ANSWER_RESERVE = 0.25
CLIENT_CACHE = 1024  # distinct FastAGI client addresses remembered (a handful of PBXs)

# One command, no round trip: what a call refused at max_sessions is told.
BUSY_ANSWER = b'EXEC MSet "SCREEN_RESULT=ERROR,SCREEN_ERROR=busy"\n'

Route = Callable[[AGISession, Environment], Awaitable[Outcome]]


@dataclass
class ServerStats:
    """Counters for `status` and /metrics."""

    sessions: int = 0
    active: int = 0
    refused_busy: int = 0
    refused_client: int = 0
    refused_key: int = 0
    evicted: int = 0  # connections closed before their environment, to make room
    reset_early: int = 0  # connections reset by the peer before their session started
    timeouts: int = 0
    protocol_errors: int = 0
    injections: int = 0
    results: dict[str, int] = field(default_factory=dict)


class RefusalLog:
    """Refused connections as a few lines, not one each: a flood of them (Asterisk
    past max_sessions, a scanner on the port) is seen without flooding the log. The
    first of a burst is logged at once, the rest as one summary line every
    SUMMARY_EVERY seconds, by reason, while they go on."""

    SUMMARY_EVERY = 10.0
    LEVEL = logging.WARNING
    FIRST = "refused FastAGI connection from %s (further refusals: one line every %.0fs)"
    MORE = "refused %d FastAGI connections more: %s"
    REASONS = {
        "busy": "busy (max_sessions)",
        "client": "not in allowed_clients",
        "reset": "reset before the session",
        "key": "wrong or missing key",
        "idle": "closed at max_sessions before their environment",
    }

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last: dict[str, str] = {}  # reason -> the latest such refusal, for the summary
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, reason: str, text: str) -> None:
        if self._timer is None:
            log.log(self.LEVEL, self.FIRST, text, self.SUMMARY_EVERY)
            self._timer = asyncio.get_running_loop().call_later(self.SUMMARY_EVERY, self._summary)
            return
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.last[reason] = text

    def _summary(self) -> None:
        self._timer = None
        if not self.counts:
            return  # the burst is over: the next refusal is logged at once again
        self._log()
        self._timer = asyncio.get_running_loop().call_later(self.SUMMARY_EVERY, self._summary)

    def _log(self) -> None:
        parts = [
            f"{n} {self.REASONS.get(reason, reason)} (last from {self.last[reason]})"
            for reason, n in sorted(self.counts.items())
        ]
        log.log(self.LEVEL, self.MORE, sum(self.counts.values()), "; ".join(parts))
        self.counts.clear()
        self.last.clear()

    def close(self) -> None:
        """At stop: what the next summary would have said."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.counts:
            self._log()


class UncountedLog(RefusalLog):
    """Calls whose store step failed (SCREEN_COUNTED=unknown, the NOTICE logged) as a
    few lines too: a Redis outage under a flood is hundreds of them a second."""

    LEVEL = logging.ERROR
    FIRST = "count unknown for a call from %s; the NOTICE is logged (more: one line every %.0fs)"
    MORE = "%d more calls with their count unknown: %s"
    REASONS = {"store": "store step failed or ran out of time"}


class Observer:
    """Receives one call per finished session; metrics.py plugs in here.

    `ended` says how a session without an outcome ended: "timeout", "protocol" (the
    peer broke the protocol or closed early), "connection", or "refused" (a wrong or
    missing key: told to `refused` as well, it is not a session); "" when it has one."""

    def session_done(
        self,
        route: str,
        outcome: Outcome | None,
        seconds: float,
        injected: bool = False,
        ended: str = "",
    ) -> None:
        pass

    def session_started(self) -> None:
        pass

    def refused(self, why: str) -> None:
        pass


class FastAGIServer:
    def __init__(
        self,
        screener: Screener,
        allowed_clients: AddressSet,
        max_sessions: int,
        session_timeout: float,
        observer: Observer | None = None,
        key: str = "",
    ) -> None:
        self.routes: dict[str, Route] = {SCREEN_ROUTE: screener.screen}
        self.screener = screener
        # Clean calls screened from the connection's callbacks, with no task (quick.py).
        self.quick = screener.quick
        # Their store step: in this process (embedded), else a Redis's reply comes later.
        self.step_now = screener.store.quick
        self._quick: set[QuickSession] = set()
        self.allowed_clients = allowed_clients
        self.key = key  # the shared secret of the AGI URL; "" for none
        self.max_sessions = max_sessions
        self.session_timeout = session_timeout
        self.observer = observer or Observer()
        self.stats = ServerStats()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._clients: dict[str, bool] = {}  # peer host -> allowed, so each is parsed once
        self.refusals = RefusalLog()
        self.uncounted = UncountedLog()
        # Sessions still waiting for their environment block, oldest first: peer text.
        self._waiting: dict[SessionStream, str] = {}

    async def start(self, host: str, port: int) -> list[tuple[str, int]]:
        # asyncio.start_server's job, with agi.SessionStream in place of asyncio's streams
        def protocol() -> SessionStream:
            if self.quick:
                return SessionStream(limit=MAX_LINE, opened=self._opened)
            return SessionStream(self._accept, MAX_LINE)

        self._server = await asyncio.get_running_loop().create_server(
            protocol, host, port, backlog=1024, reuse_address=True
        )
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for quick in list(self._quick):
            quick.hand_over()  # a task like the others, cancelled below
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.refusals.close()
        self.uncounted.close()

    async def _accept(self, stream: SessionStream) -> None:
        await self._tracked(stream, self._session(stream))

    async def _tracked(self, stream: SessionStream, session: Coroutine[Any, Any, None]) -> None:
        """Run `session` as the stream's task (SessionStream made it), known to `stop`."""
        task = stream.task
        if task is not None:
            self._tasks.add(task)
        try:
            await session
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _opened(self, stream: SessionStream) -> None:
        """A new connection, with `quick`: admitted, it is screened from its callbacks
        (quick.py) until anything unusual hands it to a task (`resume`)."""
        where = self._admit(stream)
        if where is not None:
            self._quick.add(QuickSession(self, stream, where))

    async def resume(
        self, session: AGISession, where: str, started: float, deadline: float, steps: Steps
    ) -> None:
        """A quick session's remaining `steps` as a task: the session from then on, as
        `_session` would have run it."""
        await self._tracked(session.stream, self._guarded(session, where, started, deadline, steps))

    def _refused(self, reason: str, text: str) -> None:
        self.observer.refused(reason)
        self.refusals.refused(reason, text)

    def _client_allowed(self, host: str) -> bool:
        allowed = self._clients.get(host)
        if allowed is None:
            try:
                allowed = parse_address(host) in self.allowed_clients
            except AddressError:
                allowed = False
            if len(self._clients) >= CLIENT_CACHE:
                self._clients.clear()
            self._clients[host] = allowed
        return allowed

    async def _session(self, stream: SessionStream) -> None:
        where = self._admit(stream)
        if where is None:
            return
        started, deadline = self.begin(stream, where)
        session = AGISession(stream)
        await self._guarded(session, where, started, deadline, self.run(session))

    def _admit(self, stream: SessionStream) -> str | None:
        """The peer's address text if this connection may have a session; else it is
        refused (and closed) here, and None."""
        peer = stream.get_extra_info("peername")
        if not peer:
            # The peer reset the connection before this task ran (its address went
            # with it): nothing to refuse, nothing to answer.
            self.stats.reset_early += 1
            self._refused("reset", "(address unknown): reset by the peer before the session")
            stream.transport.abort()
            return None
        # Taken now: uvloop asks the socket only when asked, and a connection reset
        # later in the session would have no address left to log.
        where = f"{peer[0]}:{peer[1]}"
        if not self._client_allowed(peer[0]):
            self.stats.refused_client += 1
            self._refused("client", f"{where}: not in allowed_clients")
            stream.transport.abort()
            return None
        if self.stats.active >= self.max_sessions and not self._evict_waiting():
            # Answered and closed at once: Asterisk still executes a buffered command.
            # No SCREEN_COUNTED: the shipped dialplan logs the NOTICE for such a call.
            self.stats.refused_busy += 1
            self._refused("busy", f"{where}: max_sessions {self.max_sessions} busy")
            stream.write(BUSY_ANSWER)
            stream.transport.close()
            return None
        return where

    def begin(self, stream: SessionStream, where: str) -> tuple[float, float]:
        """A session starts: counted, waiting for its environment; when it started
        (time.monotonic) and its deadline (the loop's clock)."""
        _quickack(stream)
        stats = self.stats
        stats.active += 1
        stats.sessions += 1
        self.observer.session_started()
        self._waiting[stream] = where
        return time.monotonic(), asyncio.get_running_loop().time() + self.session_timeout

    async def _guarded(
        self, session: AGISession, where: str, started: float, deadline: float, steps: Steps
    ) -> None:
        """Run a session's `steps` up to its deadline and end it whatever happens."""
        stream, stats = session.stream, self.stats
        route, outcome, ended = "", None, ""
        try:
            async with asyncio.timeout_at(deadline):
                route, outcome = await steps
        except _KeyRefused:
            # Like a client outside allowed_clients: nothing executed, closed at once.
            stats.refused_key += 1
            ended = "refused"
            self._refused("key", f"{where}: wrong or missing key")
            stream.transport.abort()
        except TimeoutError:
            stats.timeouts += 1
            ended = "timeout"
            log.warning("session from %s ended at session_timeout", where)
        except AGIProtocolError as error:
            stats.protocol_errors += 1
            ended = "protocol"
            log.info("session from %s ended: %s", where, error)
        except (ConnectionError, OSError) as error:
            ended = "connection"
            log.info("session from %s ended: %s", where, error)
        finally:
            self.end(session, started, route, outcome, ended)

    def end(
        self,
        session: AGISession,
        started: float,
        route: str,
        outcome: Outcome | None,
        ended: str = "",
    ) -> None:
        """A session is over: counted by how it ended, its connection closed."""
        stats = self.stats
        self._waiting.pop(session.stream, None)
        stats.active -= 1
        injected = session.injected and ended != "refused"
        if injected:
            stats.injections += 1
        if outcome is not None:
            stats.results[outcome.result] = stats.results.get(outcome.result, 0) + 1
            if outcome.counted == "unknown":
                self.uncounted.refused("store", f"{outcome.target}: {outcome.detail}")
        self.observer.session_done(route, outcome, time.monotonic() - started, injected, ended)
        with contextlib.suppress(Exception):
            session.close()

    def key_matched(self, stream: SessionStream) -> None:
        """The environment came, with the key: no longer idle, not to be evicted."""
        self._waiting.pop(stream, None)

    def quick_ended(self, quick: QuickSession) -> None:
        """A quick session is over or became a task."""
        self._quick.discard(quick)

    def _evict_waiting(self) -> bool:
        """Make room by closing the connection that has waited longest without sending
        its environment (and so its key). Asterisk sends it at once, so one that waits
        is idle, e.g. a local user's: held open, such connections filled max_sessions
        and real calls failed open."""
        if not self._waiting:
            return False
        stream = next(iter(self._waiting))
        where = self._waiting.pop(stream)
        self.stats.evicted += 1
        self._refused("idle", f"{where}: no environment yet at max_sessions, closed")
        stream.transport.abort()
        return True

    async def run(self, session: AGISession) -> tuple[str, Outcome]:
        env = await session.environment()
        if not key_matches(self.key, env.script):
            raise _KeyRefused
        self.key_matched(session.stream)
        route = env.route
        handler = self.routes.get(route)
        if handler is None:
            await session.resync()
            outcome = Outcome("ERROR", error="unknown route")
            log.warning("unknown route %r", route[:64])
        else:
            outcome = await handler(session, env)
        await self.answer(session, outcome)
        return route, outcome

    async def answer(self, session: AGISession, outcome: Outcome) -> None:
        """Every SCREEN_* variable in one command (one MSet: one round trip)."""
        await session.set_variables(screen_variables(outcome))
        self.log_ban(outcome)

    def log_ban(self, outcome: Outcome) -> None:
        """The log line of a new ban: once per ban, not per call from an address already
        banned (a scan wave)."""
        if outcome.new_ban and outcome.address is not None:
            log.warning(
                "%s banned until %d (count %s%s)",
                outcome.target or outcome.address,
                int(outcome.ban_until or 0),
                outcome.count,
                f", country {outcome.country}" if outcome.country else "",
            )


class _KeyRefused(Exception):
    """The AGI URL did not carry `server.key`."""


def _quickack(stream: SessionStream) -> None:
    """Ack Asterisk's line-by-line writes at once: without it a 520 answer or the
    HANGUP after our own command waits ~40 ms for a delayed ACK (agi-timing.txt)."""
    sock = stream.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
