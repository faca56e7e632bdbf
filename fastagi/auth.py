"""Password guessing: Asterisk's AMI security events, counted in the shared store.

The watcher logs in to the local AMI (a `read=security` user), reads its events with
the strict reader of ami.py and counts each failed authentication under the `[auth]`
rules in the shared store (store.auth_failure: same ban list, escalation, history and
agents as screened calls, reason `auth`). It runs as tasks of the service's loop: a
slow or dead AMI, or a slow Redis, never holds a FastAGI session.

What counts (README "Password guessing"):
- only trusted events (ami.py): an event with a CR or LF inside a value, a line that is
  not `Key: value`, or a key seen twice is *not counted*, logged (the first at once,
  then at most a line a minute) and counted in
  `fastagi_auth_events_total{outcome="untrusted"}`.
  Every such event in the captures belongs to an attempt that cannot succeed (an
  account name or a digest response with a CR in it matches no account and no
  password), so not counting it loses no real guess, while counting it under any of
  its `RemoteAddress` lines would let the attacker pick whom we ban;
- only the event names of `[auth] events`;
- one failed attempt once: Asterisk reports one attempt with several events (without
  an `[anonymous]` endpoint an unknown user's REGISTER gives InvalidAccountID twice and
  a ChallengeResponseFailed, all with the SIP Call-ID as SessionID). See `Attempts`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from fastagi.addresses import AddressSet, Prefixes
from fastagi.ami import (
    SECURITY_EVENTS,
    AMIError,
    Connection,
    Message,
    event_label,
    security_event,
)
from fastagi.config import AuthConfig, Config, ConfigError, ami_secret
from fastagi.protect import counted_as
from fastagi.store import Policy, Store

log = logging.getLogger("fastagi.auth")

ATTEMPT_SECONDS = 5.0  # an attempt's events come within ms of each other (captures)
ATTEMPTS_KEPT = 10_000  # sessions remembered; the oldest are forgotten first
QUEUE_MAX = 10_000  # failures waiting for the store; beyond it they are dropped (metric)
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds between reconnects, doubling, capped
CONNECT_TIMEOUT = 5.0  # connect, banner and login
SUMMARY_EVERY = 60.0  # seconds between summary lines of a repeated problem
OUTCOMES = (
    "counted",  # counted in the store (it may have made a ban)
    "banned",  # the address is banned already: counted in its record only
    "same_attempt",  # another event of an attempt already counted
    "not_counted",  # an event name outside [auth] events (ChallengeSent, ...)
    "ignored",  # the address is in screening.ignore
    "untrusted",  # CR/LF in a value, a bad line, a key twice: see the module text
    "not_security",  # a trusted message that is not a well-formed security event
    "dropped",  # the queue to the store was full
    "error",  # the store failed or timed out: not counted (fail open)
)


def auth_policy(config: Config) -> Policy:
    """The [auth] counting rules, with the screening's escalation (one ban history)."""
    auth, screening = config.auth, config.screening
    return Policy(
        auth.threshold,
        auth.window,
        auth.ban_time,
        screening.ban_time_factor,
        screening.ban_time_max,
    )


def make_watcher(config: Config, store: Store, registry: CollectorRegistry | None) -> AuthWatcher:
    """The watcher as `serve` and `watch` run it; its metrics join `registry`."""
    return AuthWatcher(
        config.auth,
        store,
        auth_policy(config),
        config.screening.ignore,
        AuthMetrics(registry),
        store_budget=max(1.0, 4 * config.redis.timeout),
        prefixes=config.screening.prefixes(),
    )


class Attempts:
    """Which failure events are new attempts.

    Keyed by (SessionID, RemoteAddress with its port): AMI's SessionID is a memory
    address Asterisk reuses for the next connection (two failed AMI logins in the
    captures share one); the client's port tells them apart. The first failure of a
    session counts. After it, only a ChallengeResponseFailed that follows an earlier
    ChallengeResponseFailed of the same session counts (a new password on the same
    Call-ID: sipvicious svcrack does that, three in the captures). So, from the
    captures: a wrong password with `[anonymous]` (ChallengeSent,
    ChallengeResponseFailed) = 1; an unknown user without it (InvalidAccountID,
    ChallengeSent, InvalidAccountID, ChallengeResponseFailed) = 1; svcrack's three
    responses on one Call-ID = 3. A session is remembered ATTEMPT_SECONDS from its
    first failure, not longer, so a client repeating one Call-ID forever is still
    counted at least once per ATTEMPT_SECONDS."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: collections.OrderedDict[tuple[str, str], list] = collections.OrderedDict()

    def is_new(self, session: str, remote: str, name: str) -> bool:
        now = self.clock()
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if now - oldest[0] < ATTEMPT_SECONDS and len(self._seen) < ATTEMPTS_KEPT:
                break
            self._seen.popitem(last=False)
        challenge = name == "ChallengeResponseFailed"
        if not session:
            return True  # nothing ties it to another event
        state = self._seen.get((session, remote))
        if state is None:
            self._seen[(session, remote)] = [now, challenge]
            return True
        if challenge and state[1]:
            return True
        state[1] = state[1] or challenge
        return False


class Summary:
    """A repeated problem as few lines (an attacker can cause thousands): the first at
    once, then at most one every SUMMARY_EVERY seconds, saying how many were left out."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.clock = clock
        self.since = 0
        self.last_line = -SUMMARY_EVERY

    def __call__(self, detail: str) -> None:
        now = self.clock()
        if now - self.last_line < SUMMARY_EVERY:
            self.since += 1
            return
        more = f" ({self.since} more since the last line)" if self.since else ""
        log.warning("%s: %s%s; one line a minute while it goes on", self.what, detail, more)
        self.since, self.last_line = 0, now


class AuthMetrics:
    """/metrics: AMI events by name and outcome, and the AMI link's state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.events = Counter(
            "fastagi_auth_events",
            "AMI security events read, by event name (or other) and outcome "
            "(counted, banned, same_attempt, not_counted, ignored, untrusted, "
            "not_security, dropped, error)",
            ["event", "outcome"],
            registry=r,
        )
        self.connected = Gauge(
            "fastagi_auth_ami_connected", "1 while logged in to the AMI", registry=r
        )
        self.connects = Counter(
            "fastagi_auth_ami_connects",
            "AMI logins that succeeded (reconnects included)",
            registry=r,
        )
        for name in (*SECURITY_EVENTS, "other"):
            for outcome in OUTCOMES:
                self.events.labels(name, outcome)


class AuthWatcher:
    """Reads the AMI, counts failures in the store; reconnects with capped backoff."""

    def __init__(
        self,
        auth: AuthConfig,
        store: Store,
        rules: Policy,
        ignore: AddressSet,
        metrics: AuthMetrics | None = None,
        store_budget: float = 1.0,
        prefixes: Prefixes | None = None,
    ) -> None:
        self.auth = auth
        self.store = store
        self.rules = rules
        self.ignore = ignore
        self.metrics = metrics or AuthMetrics()
        self.store_budget = store_budget
        self.prefixes = prefixes or Prefixes()  # counted and banned as its prefix, as calls
        self.secret = ami_secret(auth)  # ConfigError now, at start, not at each connect
        self.counted_events = frozenset(auth.events)
        self.attempts = Attempts()
        self.outcomes: collections.Counter[str] = collections.Counter()  # tests, `watch`
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(QUEUE_MAX)
        self.logged_in = asyncio.Event()
        self._untrusted = Summary("untrusted AMI event not counted")
        self._store_trouble = Summary("authentication failure not counted, store unavailable")
        self._stopping = False
        self._was_up = False  # this connection got past login
        self._connection: Connection | None = None

    def _outcome(self, name: str, outcome: str) -> str:
        self.outcomes[outcome] += 1
        self.metrics.events.labels(name if name in SECURITY_EVENTS else "other", outcome).inc()
        return outcome

    def handle(self, message: Message) -> str:
        """One message from the AMI: its outcome; a failure to count goes to the queue."""
        label = event_label(message)
        if message.problem:
            self._untrusted(f"{message.problem} ({label})")
            return self._outcome(label, "untrusted")
        if "Event" not in message.fields:
            return "response"  # an action's response: not an event at all
        try:
            event = security_event(message)
        except ValueError as error:
            if message.first in SECURITY_EVENTS:
                self._untrusted(f"{error} ({label})")
            return self._outcome(label, "not_security")
        if event.name not in self.counted_events:
            return self._outcome(label, "not_counted")
        protected = self.store.protected if self.store is not None else None
        if event.address in self.ignore or (protected and protected.reason(event.address)):
            return self._outcome(label, "ignored")
        address = counted_as(event.address, self.prefixes, self.ignore, protected)
        if not self.attempts.is_new(event.session, event.remote, event.name):
            return self._outcome(label, "same_attempt")
        try:
            self.queue.put_nowait((address, label))
        except asyncio.QueueFull:
            return self._outcome(label, "dropped")
        return "queued"

    async def count(self) -> None:
        """Hands queued failures to the store, one at a time, each within its budget."""
        while True:
            address, label = await self.queue.get()
            try:
                async with asyncio.timeout(self.store_budget):
                    verdict = await self.store.auth_failure(address, self.rules)
            except Exception as error:  # StoreError, a timeout, an odd reply: never a dead task
                self._store_trouble(str(error) or type(error).__name__)
                self._outcome(label, "error")
                continue
            finally:
                self.queue.task_done()
            if verdict.new_ban:
                log.warning(
                    "%s banned until %s: %d authentication failures (%s)",
                    address,
                    time.strftime("%H:%M:%S", time.localtime(verdict.ban_until)),
                    verdict.count,
                    label,
                )
            self._outcome(
                label, "banned" if verdict.result == "BANNED" and not verdict.new_ban else "counted"
            )

    async def _session(self) -> None:
        auth = self.auth
        connection = await Connection.open(auth.host, auth.port, CONNECT_TIMEOUT)
        self._connection = connection
        try:
            await connection.login(auth.username, self.secret, CONNECT_TIMEOUT)
            self.metrics.connected.set(1)
            self.metrics.connects.inc()
            self._was_up = True
            self.logged_in.set()
            log.info(
                "AMI %s:%d: logged in as %s, counting %s",
                auth.host,
                auth.port,
                auth.username,
                ", ".join(auth.events),
            )
            while True:
                self.handle(await connection.read())
        finally:
            self.metrics.connected.set(0)
            self.logged_in.clear()
            connection.close()
            self._connection = None

    async def run(self) -> None:
        """Until stop(): connect, log in, read; on any trouble one line, then retry with
        a backoff that doubles up to BACKOFF_MAX (reset by a login that worked)."""
        counter = asyncio.create_task(self.count(), name="auth-count")
        delay, reported = BACKOFF_FIRST, False
        try:
            while not self._stopping:
                self._was_up = False
                try:
                    await self._session()
                except (AMIError, OSError, TimeoutError, ValueError, UnicodeError) as error:
                    if self._was_up:  # it worked for a while: a new outage, start over
                        delay, reported = BACKOFF_FIRST, False
                    if not reported and not self._stopping:
                        reported = True
                        log.warning(
                            "AMI %s:%d: %s; retrying every %.0fs at most (FastAGI unaffected)",
                            self.auth.host,
                            self.auth.port,
                            str(error) or type(error).__name__,
                            BACKOFF_MAX,
                        )
                if self._stopping:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            counter.cancel()
            await asyncio.gather(counter, return_exceptions=True)

    def stop(self) -> None:
        self._stopping = True
        if self._connection is not None:
            self._connection.close()


# Actions a read=security user must be refused (harmless if it is not: they only read).
FORBIDDEN_PROBES = (
    {"Action": "Command", "Command": "core show version"},
    {"Action": "GetConfig", "Filename": "manager.conf"},
)


async def check_ami(auth: AuthConfig, timeout: float = CONNECT_TIMEOUT) -> list[tuple[bool, str]]:
    """`fastagi-ctl check`: the AMI login works, its own SuccessfulAuth event arrives (the
    user reads security events) and actions beyond that are refused. (ok, line) each."""
    where = f"AMI {auth.host}:{auth.port}"
    try:
        secret = ami_secret(auth)
    except ConfigError as error:
        return [(False, f"{where}: {error}")]
    try:
        connection = await Connection.open(auth.host, auth.port, timeout)
    except (AMIError, OSError, TimeoutError) as error:
        return [(False, f"{where}: cannot connect ({str(error) or type(error).__name__})")]
    results = []
    try:
        try:
            await connection.login(auth.username, secret, timeout)
        except (AMIError, OSError, TimeoutError) as error:
            return [
                (False, f"{where}: login as {auth.username} failed ({str(error) or 'no answer'})")
            ]
        results.append((True, f"{where}: logged in as {auth.username}"))
        results.append(await _reads_security(connection, auth.username, timeout))
        for probe in FORBIDDEN_PROBES:
            name = probe["Action"]
            try:
                reply = await connection.request(timeout, **probe)
                refused = reply.get("Response") == "Error"
            except (AMIError, OSError, TimeoutError):
                refused = False  # no clear refusal: assume it was allowed
            results.append(
                (True, f"{where}: action {name} refused, as it should be")
                if refused
                else (False, f"{where}: action {name} allowed: give the user read=security only")
            )
    finally:
        connection.close()
    return results


async def _reads_security(
    connection: Connection, username: str, timeout: float
) -> tuple[bool, str]:
    """Asterisk sends our own login's SuccessfulAuth to a user that reads security."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await connection.read()
                if message.first == "SuccessfulAuth" and message.get("AccountID") == username:
                    return True, "AMI: security events arrive (our own SuccessfulAuth)"
    except (AMIError, OSError, TimeoutError):
        return False, "AMI: no security event after login: give the user read=security"
