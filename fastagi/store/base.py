"""The store's common ground: its constants, the small types every part returns, and
StoreBase (the client, the scripts, the one error, the event stream, the clock).

Knows nothing of AGI. Every PBX of a cluster talks to the same Redis; the embedded
`memory://` mode runs the same redis-py calls and the same Lua against an in-process
fakeredis server (see embedded.py). Any Redis trouble becomes one `StoreError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from fastagi import lua
from fastagi.config import ScreeningConfig
from fastagi.keys import Keys
from fastagi.protect import Protected

log = logging.getLogger("fastagi.store")

EVENTS_MAXLEN = 10_000  # agents further behind than this do a full reconcile
UNBAN_BATCH = 500
BAN_LIST_PAGE = 5000  # ban list entries per Redis read
DETAILS_PAGE = 100  # bans per details script: <1 ms of Redis, ~25 ms of the embedded store
MAX_PAGES = 1000  # 5,000,000 bans: a bound, not a limit anyone reaches
CLOCK_SAMPLES = 3  # TIME round trips per sync_clock; the shortest one counts
POOL_SIZE = 64  # one event loop needs few; more only queue inside Redis
PRUNE_EVERY = 64  # screening steps per sweep of expired ban and counted list entries
# Streams (XADD, XREAD BLOCK) and scripts replicated by their effects by default (the
# scripts read TIME before they write) came with Redis 5.0; redis-py 8 speaks RESP3,
# whose HELLO came with 6.0. Tested with 7.0.
MIN_REDIS = (6, 0)

# Sources of a ban (holds). The threshold's is the screening step's; `ban` without
# `--hold` places the admin's; a ban written back after Redis lost it is "restored".
THRESHOLD_HOLD = "threshold"
ADMIN_HOLD = "admin"
RESTORED_HOLD = "restored"
AUTH_HOLD = "auth"  # password guessing counted from the AMI (auth.py)
FEED_HOLD = "feed:"  # + the feed's name: a blocklist's entries (feeds.py)
FEED_CHUNK = 250  # targets per feed script: a few ms of Redis each, others interleave
FEED_GROUP = 8  # feed scripts per pipeline (one round trip each)
FEED_EVENTS_MAX = 1000  # more targets than this in one import: one `sync` event instead
FEED_BATCH_KEEP = 300.0  # seconds a bulk write's batch stays readable; a later agent reads all
SYNC_REREAD_MAX = 5000  # events during a bulk write re-checked by target; more: read all
HEARTBEAT_INTERVAL = 5.0  # seconds between an agent's heartbeats (older ones carry none)
STALE_BEATS = 3  # an agent silent for this many of its heartbeat intervals is stale


class Link(Protocol):
    """Where the screening step's EVALSHA goes instead of the client: one shared
    connection (redis_link.SharedLink), or the embedded store's Python step
    (embedded.NativeScreen)."""

    async def execute(self, *args: Any) -> Any: ...

    async def close(self) -> None: ...


def parse_event_id(text: str) -> tuple[int, int]:
    """A stream entry id ("ms-seq") as a pair that sorts as Redis orders them."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class StoreError(Exception):
    """Redis is unreachable, slow or refused the step; the message says which."""


@dataclass(frozen=True)
class Policy:
    """The screening rules the Lua step applies, in seconds."""

    threshold: int
    window: float
    ban_time: float
    ban_time_factor: float
    ban_time_max: float

    @classmethod
    def from_config(cls, screening: ScreeningConfig) -> Policy:
        return cls(
            screening.threshold,
            screening.window,
            screening.ban_time,
            screening.ban_time_factor,
            screening.ban_time_max,
        )

    @property
    def history_ms(self) -> int:
        """How long a ban record outlives its ban, so repeat offenders escalate."""
        return int(self.ban_time_max * 1000)


@dataclass(frozen=True)
class Hold:
    """One source's hold on a target: the target stays banned until its last hold ends."""

    source: str
    until: float
    reason: str


@dataclass(frozen=True)
class Placed:
    """What a ban did: the target's ban end (its longest hold's), this source's hold end,
    and whether the hold was placed or lengthened (False: it already lasted as long)."""

    until: float
    hold_until: float
    placed: bool


@dataclass(frozen=True)
class Lifted:
    """What lifting one target's hold(s) did: `ended` the ban, or `until` is the end of
    the holds still keeping it banned; `held` False when the source held no ban there."""

    held: bool
    ended: bool
    until: float


@dataclass(frozen=True)
class Verdict:
    """What one screened call got: COUNTED or BANNED, the count, the ban end (unix s),
    and whether this very call made the ban (the others met an existing one)."""

    result: str
    count: int
    ban_until: float
    new_ban: bool = False


def as_text(value: Any) -> str:
    """Redis bytes as text; bytes that are not UTF-8 (another host's garbage) show as
    escapes instead of raising, so a reader can reject the entry and go on."""
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)


class _ScreenParts:
    """The screening step's EVALSHA arguments, the constant ones encoded once.

    The step runs once per call; redis-py would re-encode its 18 str and int arguments
    every time (~20% of the step's client CPU in bench/ profiles). Order and meaning:
    lua.SCREEN's KEYS and ARGV.
    """

    def __init__(self, encode: Callable[[Any], bytes], keys: Keys, policy: Policy, pbx_id: str):
        p = policy
        self.count_prefix, self.record_prefix, self.holds_prefix = keys.per_address_prefixes()
        self.by_hour = encode(keys.bans_by_hour)
        self.shared_keys = tuple(
            encode(k) for k in (keys.banned, keys.counted, keys.events, keys.stats)
        )
        self.encode = encode
        self.threshold = encode(p.threshold)
        self.rules = tuple(
            encode(v)
            for v in (
                int(p.window * 1000),
                int(p.ban_time * 1000),
                p.ban_time_factor,
                int(p.ban_time_max * 1000),
                pbx_id,
                THRESHOLD_HOLD,
            )
        )
        self.tail = (encode(EVENTS_MAXLEN), encode(p.history_ms))
        # A call's member in its address's sorted set: unique per call, cluster-wide,
        # without a random draw (a getrandom() system call) per call.
        self.member_prefix = secrets.token_hex(8).encode() + b"-"
        self.steps = itertools.count()

    def command(
        self, sha: str, ip: str, injected: bool, threshold: int | None = None, country: str = ""
    ) -> tuple:
        """`threshold`: this caller's own (a country rule), else the configured one;
        `country` goes into the ban record when this call bans."""
        address = ip.encode()
        step = next(self.steps)
        return (
            "EVALSHA",
            sha,
            8,
            self.count_prefix + address,
            self.record_prefix + address,
            *self.shared_keys,
            self.holds_prefix + address,
            self.by_hour,
            address,
            self.threshold if threshold is None else self.encode(threshold),
            *self.rules,
            b"%s%x" % (self.member_prefix, step),
            *self.tail,
            b"1" if injected else b"0",
            b"1" if step % PRUNE_EVERY == 0 else b"0",  # which steps sweep expired entries
            country.encode(),
        )


class StoreBase:
    """One cluster's Redis (one key prefix): the client, the scripts, the event stream and
    the clock that every part of the Store shares."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        policy: Policy,
        pbx_id: str,
        wait: tuple[int, float] | None = None,
        link: Link | None = None,
        clock: Callable[[], float] = time.time,
        protected: Protected | None = None,
        newest_event: Callable[[str], str | None] | None = None,
    ) -> None:
        self.redis = client
        # The embedded store's event stream, peeked at without a command (embedded.py).
        self._newest_event = newest_event
        # This host's clock (injectable for tests) and how far Redis's TIME is ahead of
        # it (sync_clock): ban ends come from Redis's clock, remaining times must too.
        self.clock = clock
        self.clock_offset = 0.0
        # Never written to the ban list, whoever asks (protect.py).
        self.protected = protected
        # The screening step's own connection (redis_link.py), when the service has one.
        self.link = link
        self.keys = keys
        self.policy = policy
        self.pbx_id = pbx_id
        # (replicas, timeout s): after a step that bans, WAIT until that many replicas
        # hold it, so a failover (which promotes a replica) cannot lose the ban.
        replicas, wait_timeout = wait or (0, 0.1)
        self.wait_replicas = int(replicas)
        self.wait_timeout_ms = max(1, int(wait_timeout * 1000))
        self.unreplicated_bans = 0  # bans WAIT could not confirm (logged)
        self.unreplicated_recent: collections.deque[str] = collections.deque(maxlen=1000)
        self._screen = client.register_script(lua.SCREEN)
        # redis-py's own encoder, once, for the arguments that never change.
        self._screen_parts = _ScreenParts(client.get_encoder().encode, keys, policy, pbx_id)
        self._ban = client.register_script(lua.BAN)
        self._unban = client.register_script(lua.UNBAN)
        self._restore = client.register_script(lua.RESTORE)
        self._auth_failure = client.register_script(lua.AUTH_FAILURE)
        self._feed = client.register_script(lua.FEED)
        self._ban_details = client.register_script(lua.BAN_DETAILS)
        self._notify_lease = client.register_script(lua.NOTIFY_LEASE)
        self._notify_cursor = client.register_script(lua.NOTIFY_CURSOR)
        self._notify_release = client.register_script(lua.NOTIFY_RELEASE)

    async def _call(self, what: str, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, RedisClusterException, OSError) as error:
            raise StoreError(f"Redis {what} failed: {error or type(error).__name__}") from None

    def _step_keys(self, ip: str) -> list[str]:
        k = self.keys
        return [
            *(k.count(ip), k.record(ip), k.banned, k.counted, k.events, k.stats, k.holds(ip)),
            k.bans_by_hour,
        ]

    @contextlib.asynccontextmanager
    async def _one_connection(self, what: str):
        """A client pinned to one pooled connection; releasing it cannot raise past us."""
        conn = self.redis.client()
        try:
            yield conn
        finally:
            try:
                await conn.aclose()
            except (RedisError, OSError) as error:
                raise StoreError(f"Redis {what} failed: {error or type(error).__name__}") from None

    async def _replicated(self, conn: aioredis.Redis, ip: str) -> None:
        """WAIT until `wait_replicas` replicas hold this connection's writes (the ban)."""
        acked = await self._call("WAIT", conn.wait(self.wait_replicas, self.wait_timeout_ms))
        if int(acked) < self.wait_replicas:
            self.unreplicated_bans += 1
            self.unreplicated_recent.append(ip)
            log.warning(
                "ban of %s reached %d of %d replicas within %d ms: a failover now could lose it",
                ip,
                int(acked),
                self.wait_replicas,
                self.wait_timeout_ms,
            )

    async def events_after(
        self, last_id: str, block_ms: int | None = None, count: int = 1000
    ) -> list[tuple[str, dict[str, str]]]:
        """Ban/unban events after `last_id`, waiting up to `block_ms` for the first."""
        reply = await self._call(
            "event read",
            self.redis.xread({self.keys.events: last_id}, count=count, block=block_ms),
        )
        events = []
        for _stream, entries in reply or []:
            for event_id, fields in entries:
                text = {as_text(k): as_text(v) for k, v in fields.items()}
                events.append((as_text(event_id), text))
        return events

    def nothing_after(self, last_id: str) -> bool:
        """True when surely no event came after `last_id`: the embedded store can tell
        without a command (a shared Redis cannot: False, ask it)."""
        if self._newest_event is None:
            return False
        newest = self._newest_event(self.keys.events)
        return newest is not None and parse_event_id(newest) <= parse_event_id(last_id)

    async def first_event_id(self) -> str | None:
        """The oldest event still kept; an agent whose last id is older missed some."""
        rows = await self._call("event read", self.redis.xrange(self.keys.events, count=1))
        return as_text(rows[0][0]) if rows else None

    async def last_event_id(self) -> str:
        rows = await self._call("event read", self.redis.xrevrange(self.keys.events, count=1))
        return as_text(rows[0][0]) if rows else "0-0"

    async def sync_clock(self) -> float:
        """Measure how far Redis's TIME is ahead of this host's clock (the midpoint of
        the round trip); every reader of ban ends uses it, so a PBX whose clock is off
        by an hour still holds a ban for its true remaining time. Call it at connect
        and now and then (the agent: every heartbeat).

        The midpoint is off by at most half the round trip, and a first TIME on a new
        connection also waits for the connect: of CLOCK_SAMPLES round trips the
        shortest one counts (as NTP does)."""
        samples = []  # (round trip, offset)
        for _ in range(CLOCK_SAMPLES):
            before = self.clock()
            seconds, micros = await self._call("TIME", self.redis.time())
            after = self.clock()
            redis_time = int(seconds) + int(micros) / 1e6
            samples.append((after - before, redis_time - (before + after) / 2))
        self.clock_offset = min(samples)[1]
        return self.clock_offset

    def now(self) -> float:
        """Redis's time as of the last sync_clock(), in unix seconds."""
        return self.clock() + self.clock_offset

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    async def ping(self) -> None:
        await self._call("ping", self.redis.ping())

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        # Bounded: a pool whose blocking XREAD was cancelled can wait on its lock forever.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.redis.aclose(), 1.0)
