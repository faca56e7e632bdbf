"""The shared store: counts, bans and ban events in Redis, one atomic script per step.

Knows nothing of AGI. Every PBX of a cluster talks to the same Redis; the embedded
`memory://` mode runs the same redis-py calls and the same Lua against an in-process
fakeredis server (see embedded.py). Any Redis trouble becomes one `StoreError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry  # the asyncio one: the sync Retry never retries a coroutine
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from fastagi import lua
from fastagi.config import RedisConfig, ScreeningConfig
from fastagi.keys import Keys
from fastagi.protect import Protected
from fastagi.redis_cluster import ClusterClient, cluster_client

log = logging.getLogger("fastagi.store")

EVENTS_MAXLEN = 10_000  # agents further behind than this do a full reconcile
UNBAN_BATCH = 500
BAN_LIST_PAGE = 5000  # ban list entries per Redis read
DETAILS_PAGE = 100  # bans per details script: <1 ms of Redis, ~25 ms of the embedded store
MAX_PAGES = 1000  # 5,000,000 bans: a bound, not a limit anyone reaches
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


def redis_client(
    config: RedisConfig, caller_deadlines: bool = False
) -> aioredis.Redis | ClusterClient:
    """A redis-py client for redis://, rediss://, unix://, Sentinel or Redis Cluster,
    with short timeouts.

    One retry only: a stale pooled connection after a Redis restart is replaced at
    once, while a Redis that is really down fails fast and the call fails open.
    `caller_deadlines`: no per-command socket timeout, because every caller bounds its
    own wait (the service: the screening step's budget, the metrics scrape's, startup's
    ping). redis-py's per-command timeout costs a task and a timer per command, ~45 us
    of a screened call's CPU in bench/; a cancelled command closes its connection.
    """
    options: dict[str, Any] = {
        "socket_timeout": None if caller_deadlines else config.timeout,
        "socket_connect_timeout": config.timeout,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
    }
    if config.cluster:
        try:
            return cluster_client(config.url, Keys(config.key_prefix).banned, **options)
        except RedisClusterException as error:
            raise StoreError(f"Redis Cluster client: {error}") from None
    if not config.sentinels:
        # Bounded, and waiting for a free connection rather than failing at the cap;
        # the caller's deadline (the screening step's budget) bounds that wait.
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url, max_connections=POOL_SIZE, timeout=None, **options
        )
        return aioredis.Redis(connection_pool=pool)
    hosts = []
    for entry in config.sentinels:
        host, _, port = entry.rpartition(":")
        hosts.append((host.strip("[]"), int(port)))
    sentinel = Sentinel(hosts, sentinel_kwargs={"socket_timeout": config.timeout}, **options)
    return sentinel.master_for(config.sentinel_service, **options)


@dataclass(frozen=True)
class RedisFacts:
    """What `check` and the startup check learn of the shared Redis. None: refused
    (a renamed command or an ACL), with Redis's own words in `refused`."""

    version: str | None
    appendonly: bool | None
    appendfsync: str | None
    save: str | None  # the RDB snapshot schedule ("" = none)
    refused: tuple[str, ...] = ()


def version_tuple(text: str) -> tuple[int, ...]:
    """ "7.0.15" -> (7, 0, 15), comparable with MIN_REDIS; a part without digits is 0."""
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _verdict(reply: list) -> Verdict:
    result, count, until, new_ban = reply
    return Verdict(_text(result), int(count), int(until) / 1000.0, bool(new_ban))


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


def heartbeat_age(info: dict[str, Any], now: float) -> tuple[float, bool]:
    """(seconds since an agent's last heartbeat, whether that is stale), `now` being
    Redis's time like the heartbeat's; a heartbeat without a usable time is stale."""
    try:
        age = now - float(info["time"])
        interval = float(info.get("interval", HEARTBEAT_INTERVAL))
    except (KeyError, TypeError, ValueError):
        return math.inf, True
    if not (math.isfinite(age) and math.isfinite(interval)):
        return math.inf, True
    return age, age > STALE_BEATS * interval


def _text(value: Any) -> str:
    """Redis bytes as text; bytes that are not UTF-8 (another host's garbage) show as
    escapes instead of raising, so a reader can reject the entry and go on."""
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)


def _escaped(text: str, limit: int = 80) -> str:
    """Text from Redis that is not ours, safe for one line of output."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def _running_holds(raw: dict, listed: float | None, record_reason: str, now: float) -> list[Hold]:
    """A holds hash as read from Redis: its running holds, longest first. A ban list end
    beyond every hold (written before holds existed) is the hold "legacy", as the
    scripts treat it."""
    out = []
    for source, value in raw.items():
        end, _, reason = _text(value).partition(" ")
        if end.isdigit() and int(end) / 1000.0 > now:
            out.append(Hold(_text(source), int(end) / 1000.0, reason))
    if listed and listed / 1000.0 > max([now, *(hold.until for hold in out)]):
        out.append(Hold("legacy", listed / 1000.0, record_reason))
    return sorted(out, key=lambda hold: (-hold.until, hold.source))


def _heartbeat(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError:
        info = None
    numbers = (int, float)
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("time", 0), numbers)
        or not isinstance(info.get("applied", 0), int)
        or any(isinstance(info.get(key), bool) for key in ("time", "applied"))
        or not math.isfinite(info.get("time", 0))
    ):
        return {"unreadable": _escaped(text)}
    return info


class Store:
    """Counts, bans and events for one cluster (one Redis, one key prefix)."""

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

    async def screen(
        self, ip: str, injected: bool = False, threshold: int | None = None, country: str = ""
    ) -> Verdict:
        """Count one call from `ip` and ban it at the threshold (`threshold`: a country
        rule's instead of the configured one), atomically, cluster-wide; `injected` also
        counts an injection attempt, in the same round trip; `country` is recorded with
        the ban."""
        command = self._screen_parts.command(self._screen.sha, ip, injected, threshold, country)
        if not self.wait_replicas:
            execute = self.link.execute if self.link else self.redis.execute_command
            return _verdict(await self._call("screening step", self._evalsha(execute, command)))
        # WAIT counts the writes of its own connection: one connection for both.
        async with self._one_connection("screening step") as conn:
            reply = await self._call("screening step", self._evalsha(conn.execute_command, command))
            verdict = _verdict(reply)
            if verdict.result == "BANNED":
                # Every BANNED answer, not only the new ban: a step retried after a
                # timeout answers "already banned" for a ban that may not have reached
                # a replica yet.
                await self._replicated(conn, ip)
        return verdict

    async def _evalsha(self, execute: Callable[..., Awaitable[Any]], command: tuple) -> Any:
        """The screening script by its hash; loaded first if this Redis lost it."""
        try:
            return await execute(*command)
        except NoScriptError:
            await self.redis.script_load(lua.SCREEN)
            return await execute(*command)

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

    async def ban(
        self, ip: str, duration: float | None, reason: str, hold: str = ADMIN_HOLD
    ) -> float:
        """Ban `ip` now for `duration` seconds (None: the escalating ban_time) under the
        source `hold`; the end of its ban, which a longer hold may keep beyond this one."""
        return (await self.hold(ip, hold, reason, duration=duration)).until

    async def hold(
        self,
        target: str,
        source: str,
        reason: str,
        duration: float | None = None,
        until: float | None = None,
        counts: bool = True,
    ) -> Placed:
        """Place `source`'s hold on `target` for `duration` seconds (None: the escalating
        ban_time) or `until` a unix time. A hold never shortens a ban, not even the same
        source's own earlier hold. `counts` False (a restored ban) leaves the previous-ban
        count and the totals alone. A protected target raises ProtectedError and nothing
        is written."""
        if self.protected is not None:
            self.protected.check_ban(target)
        p = self.policy
        args = [
            target,
            source,
            int((duration or 0) * 1000),
            round((until or 0) * 1000),
            int(p.ban_time * 1000),
            p.ban_time_factor,
            int(p.ban_time_max * 1000),
            self.pbx_id,
            reason,
            EVENTS_MAXLEN,
            p.history_ms,
            1 if counts else 0,
        ]
        keys = self._step_keys(target)
        if not self.wait_replicas:
            reply = await self._call("ban", self._ban(keys=keys, args=args))
        else:
            async with self._one_connection("ban") as conn:
                reply = await self._call("ban", self._ban(keys=keys, args=args, client=conn))
                await self._replicated(conn, target)
        ban_until, hold_until, placed = (int(x) for x in reply[:3])
        return Placed(ban_until / 1000.0, hold_until / 1000.0, bool(placed))

    async def note_inside(self, wider: str, target: str, until: float) -> tuple[int, bool]:
        """Record that `target`, inside `wider`, is banned until `until`: (how many bans
        inside `wider` are running, whether `wider` itself is banned now). One pipeline:
        a call racing it may see one ban fewer, which delays the escalation by one ban."""
        now_ms = self.now_ms()
        key = self.keys.inside(wider)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {target: int(until * 1000)})
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.zcard(key)
            pipe.pexpire(key, self.policy.history_ms)  # no ban outlives ban_time_max
            pipe.zscore(self.keys.banned, wider)
            _, _, running, _, wider_until = await self._call("escalation", pipe.execute())
        return int(running), wider_until is not None and wider_until > now_ms

    async def unban(self, ips: Iterable[str], hold: str | None = None) -> list[str]:
        """Lift these bans (`hold` None: every hold, and reset their counts; else only that
        source's hold) everywhere; the addresses whose ban ended."""
        return [ip for ip, lifted in (await self.lift(ips, hold)).items() if lifted.ended]

    async def lift(self, targets: Iterable[str], hold: str | None = None) -> dict[str, Lifted]:
        """Lift `hold`'s hold on each target (None: every hold, and reset the counts);
        what that did to each."""
        out: dict[str, Lifted] = {}
        batch = list(targets)
        for start in range(0, len(batch), UNBAN_BATCH):
            chunk = batch[start : start + UNBAN_BATCH]
            k = self.keys
            keys = [k.banned, k.counted, k.events, k.stats]
            for target in chunk:
                keys += [k.count(target), k.record(target), k.holds(target)]
            result = await self._call(
                "unban",
                self._unban(keys=keys, args=[self.pbx_id, EVENTS_MAXLEN, hold or "", *chunk]),
            )
            for target, (state, until) in zip(chunk, result, strict=True):
                state = int(state)
                out[target] = Lifted(state != 0, state == 1, int(until) / 1000.0)
        return out

    async def epoch(self) -> str | None:
        """The ban list's epoch token (keys.py): gone or changed when Redis lost its data."""
        value = await self._call("epoch read", self.redis.get(self.keys.epoch))
        return None if value is None else _text(value)

    async def restore_bans(
        self, bans: dict[str, float], token: str, reason: str = "restored"
    ) -> tuple[str, int]:
        """Write back bans (address -> end, unix s) an agent applied before Redis lost
        its data, the longer end winning, and set the epoch token unless one is there.
        The token in place and how many bans were written (new or longer)."""
        items = list(bans.items())
        epoch, written = token, 0
        k = self.keys
        # batches as for unban; at least one call, so an empty write-back sets the token
        for start in range(0, max(len(items), 1), UNBAN_BATCH):
            chunk = items[start : start + UNBAN_BATCH]
            args: list[Any] = [self.pbx_id, EVENTS_MAXLEN, self.policy.history_ms, token]
            args += [reason, RESTORED_HOLD]
            keys = [k.banned, k.events, k.epoch, k.stats]
            for ip, until in chunk:
                args += [ip, int(until * 1000)]
                keys += [k.record(ip), k.holds(ip)]
            reply = await self._call("ban write-back", self._restore(keys=keys, args=args))
            epoch, written = _text(reply[0]), written + int(reply[1])
        return epoch, written

    async def feed_holds(
        self,
        targets: list[str],
        source: str,
        reason: str,
        until: float,
        chunk: int = FEED_CHUNK,
        pipelined: bool = True,
    ) -> tuple[int, int]:
        """Place `source`'s hold until `until` (unix s, Redis's clock) on every target, in
        chunks of one script each: (holds placed or lengthened, bans started). The
        caller filtered out protected targets. `pipelined`: every chunk in one round
        trip per FEED_GROUP chunks (a real Redis runs each script alone and serves other
        clients between them);
        False awaits each chunk (the embedded store runs scripts on this loop). A batch
        larger than FEED_EVENTS_MAX sends one `sync` event after it instead of one event
        per ban: agents then reconcile once, in one firewall transaction."""
        publish = len(targets) <= FEED_EVENTS_MAX
        k = self.keys
        token = "" if publish else secrets.token_hex(8)
        keep = 0 if publish else int(FEED_BATCH_KEEP * 1000)
        after = "" if publish else await self.last_event_id()  # where the write began
        calls = []
        for start in range(0, len(targets), chunk):
            part = targets[start : start + chunk]
            keys = [k.banned, k.events, k.stats, k.feed_batch(token)]
            for target in part:
                keys += [k.record(target), k.holds(target)]
            args: list[Any] = [self.pbx_id, EVENTS_MAXLEN, self.policy.history_ms, source]
            args += [reason, int(until * 1000), keep, *part]
            calls.append((keys, args))
        replies: list[Any] = []
        if pipelined:
            # a pipeline per few chunks: packing 100,000 entries at once would hold this
            # loop (the FastAGI sessions' too) for a second; between groups it serves them
            for start in range(0, len(calls), FEED_GROUP):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls[start : start + FEED_GROUP]:
                        await self._feed(keys=keys, args=args, client=pipe)
                    replies += await self._call("feed import", pipe.execute())
        else:
            for keys, args in calls:
                replies.append(await self._call("feed import", self._feed(keys=keys, args=args)))
        placed = sum(int(reply[0]) for reply in replies)
        started = sum(int(reply[1]) for reply in replies)
        if not publish and any(int(reply[2]) for reply in replies):
            fields = {"op": "sync", "source": source, "pbx_id": self.pbx_id, "count": placed}
            fields.update({"batch": token, "after": after})
            await self._call(
                "feed import",
                self.redis.xadd(k.events, fields, maxlen=EVENTS_MAXLEN, approximate=True),
            )
        return placed, started

    async def sync_batch(
        self, token: str, after: tuple[int, int], upto: str
    ) -> tuple[dict[str, str], dict[str, str | None]] | None:
        """The ban-list entries a bulk write changed, for the agent at that write's `sync`
        event `upto`: (target -> end in ms as written, target -> end in ms now or None
        when not banned now). None when they cannot be told (the batch expired or is
        garbled, or the events since the write began, `after`, were trimmed away or are
        too many): the agent reads the whole list then.

        An entry that an event during the write also changed is read again from the ban
        list (the second dict): that event may have come after the entry was written, and
        the newer state must win. Events after `upto` the agent applies next, as always."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(k.feed_batch(token))
            pipe.xrange(k.events, f"{after[0]}-{after[1]}", upto, count=SYNC_REREAD_MAX + 2)
            pipe.xrange(k.events, count=1)
            pipe.xlen(k.events)
            raw, during, first, length = await self._call("sync batch read", pipe.execute())
        if raw is None:
            return None
        parts = _text(raw).split()
        # a stream shorter than its cap was never trimmed (trimming stops at the cap)
        kept = length < EVENTS_MAXLEN or bool(first and parse_event_id(_text(first[0][0])) <= after)
        if len(parts) % 2 or not kept or len(during) > SYNC_REREAD_MAX + 1:
            return None
        written = dict(zip(parts[::2], parts[1::2], strict=True))
        named = ({_text(key): value for key, value in fields.items()} for _, fields in during)
        touched = {_text(fields["ip"]) for fields in named if "ip" in fields}
        again = [target for target in touched if target in written]
        current: dict[str, str | None] = {}
        if again:
            scores = await self._call("sync batch read", self.redis.zmscore(k.banned, again))
            for target, score in zip(again, scores, strict=True):
                del written[target]
                current[target] = None if score is None else f"{int(score)}"
        return written, current

    async def feed_claim(self, name: str, period: float) -> bool:
        """Take this period's refresh of a feed for this PBX (SET NX, expiring after 90%
        of the period): False when another PBX of the cluster has it."""
        ttl_ms = max(1, int(period * 900))
        lock = self.redis.set(self.keys.feed_lock(name), self.pbx_id, nx=True, px=ttl_ms)
        return bool(await self._call("feed lock", lock))

    async def feed_release(self, name: str) -> None:
        """Let another PBX try this period's refresh (ours failed)."""
        await self._call("feed lock", self.redis.delete(self.keys.feed_lock(name)))

    async def set_feed_state(self, name: str, state: dict[str, Any]) -> None:
        """A feed's last refresh (when, entries, held until, error), for `status`."""
        await self._call("feed state", self.redis.hset(self.keys.feeds, name, json.dumps(state)))

    async def feed_states(self) -> dict[str, dict[str, Any]]:
        """Each feed's last refresh as recorded; an entry that is not a JSON object is
        left out."""
        raw = await self._call("feed state", self.redis.hgetall(self.keys.feeds))
        out = {}
        for name, value in raw.items():
            try:
                state = json.loads(_text(value))
            except ValueError:
                continue
            if isinstance(state, dict):
                out[_text(name)] = state
        return out

    async def unban_all(self, hold: str | None = None) -> list[str]:
        return await self.unban(list(await self.banned()), hold)

    async def holds(self, target: str) -> list[Hold]:
        """The running holds on `target`, longest first. A ban list end beyond every
        hold (written before holds existed) shows as the hold "legacy", as the scripts
        treat it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.holds(target))
            pipe.zscore(self.keys.banned, target)
            pipe.hget(self.keys.record(target), "reason")
            raw, listed, record_reason = await self._call("holds read", pipe.execute())
        return _running_holds(raw, listed, _text(record_reason or ""), self.now())

    async def ban_details(
        self, bans: list[tuple[str, float]]
    ) -> AsyncIterator[list[tuple[str, float, dict[str, str], list[Hold]]]]:
        """(target, ban end, record, running holds) of each (target, ban end), a page at
        a time: one read-only script per DETAILS_PAGE targets keeps Redis (which every
        screening step of the cluster waits on) free between pages, and the caller can
        yield its loop between them."""
        now = self.now()
        for start in range(0, len(bans), DETAILS_PAGE):
            page = bans[start : start + DETAILS_PAGE]
            keys = []
            for target, _ in page:
                keys += [self.keys.record(target), self.keys.holds(target)]
            reply = await self._call("ban details read", self._ban_details(keys=keys))
            out = []
            for n, (target, until) in enumerate(page):
                fields, flat = reply[2 * n], reply[2 * n + 1]
                record = {
                    _text(k): _text(v) for k, v in zip(fields[::2], fields[1::2], strict=True)
                }
                raw = dict(zip(flat[::2], flat[1::2], strict=True))
                holds = _running_holds(raw, until * 1000, record.get("reason", ""), now)
                out.append((target, until, record, holds))
            yield out

    async def banned(self) -> dict[str, float]:
        """The ban list: address -> ban end (unix s), expired entries left out.

        Read in pages: one 100,000-entry reply takes longer than `redis.timeout` to
        read and parse. Pages follow the score (the ban end) with an offset among
        equal scores, so entries added or removed meanwhile shift nothing already read.
        """
        low, offset = f"({self.now_ms()}", 0
        out: dict[str, float] = {}
        for _ in range(MAX_PAGES):
            rows = await self._call(
                "ban list read",
                self.redis.zrangebyscore(
                    self.keys.banned,
                    low,
                    "+inf",
                    start=offset,
                    num=BAN_LIST_PAGE,
                    withscores=True,
                ),
            )
            for ip, score in rows:
                out[_text(ip)] = score / 1000.0
            if len(rows) < BAN_LIST_PAGE:
                return out
            last = f"{int(rows[-1][1])}"
            ties = sum(1 for _, score in rows if f"{int(score)}" == last)
            if ties == len(rows) and low == last:
                offset += ties  # a whole page with one ban end: go on within it
            else:
                low, offset = last, ties
        raise StoreError(f"Redis ban list read: more than {MAX_PAGES} pages")

    async def banned_count(self) -> int:
        """How many bans are running, in one ZCOUNT."""
        now_ms = self.now_ms()
        return int(
            await self._call(
                "ban list count", self.redis.zcount(self.keys.banned, f"({now_ms}", "+inf")
            )
        )

    async def counted(self) -> dict[str, int]:
        """Addresses counted in their current window, with their counts."""
        now_ms = self.now_ms()
        ips = await self._call(
            "counted read", self.redis.zrangebyscore(self.keys.counted, f"({now_ms}", "+inf")
        )
        ips = [_text(ip) for ip in ips]
        if not ips:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for ip in ips:
                pipe.zcard(self.keys.count(ip))
            counts = await self._call("counts read", pipe.execute())
        return {ip: int(n) for ip, n in zip(ips, counts, strict=True) if n}

    async def auth_reset(self, ips: Iterable[str]) -> None:
        """Forget these addresses' authentication failures (`unban` resets every count)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for ip in ips:
                pipe.delete(self.keys.auth_count(ip))
                pipe.zrem(self.keys.auth_counted, ip)
            await self._call("auth reset", pipe.execute())

    async def auth_failure(self, ip: str, rules: Policy) -> Verdict:
        """Count one authentication failure from `ip` under `rules` (the [auth] ones) and
        ban it at their threshold with reason `auth`: the same ban list, history and
        escalation as screened calls, in counts of its own, atomically, cluster-wide."""
        k = self.keys
        keys = [k.auth_count(ip), k.record(ip), k.banned, k.auth_counted, k.events, k.stats]
        keys += [k.holds(ip), k.bans_by_hour]
        args = [
            ip,
            rules.threshold,
            int(rules.window * 1000),
            int(rules.ban_time * 1000),
            rules.ban_time_factor,
            int(rules.ban_time_max * 1000),
            self.pbx_id,
            AUTH_HOLD,
            secrets.token_hex(8),
            EVENTS_MAXLEN,
            rules.history_ms,
        ]
        return _verdict(await self._call("auth step", self._auth_failure(keys=keys, args=args)))

    async def auth_counted(self, window: float) -> dict[str, int]:
        """Addresses with authentication failures in the last `window` seconds (the
        [auth] one), with how many, for `status`."""
        now_ms = self.now_ms()
        listed = await self._call(
            "auth read", self.redis.zrangebyscore(self.keys.auth_counted, f"({now_ms}", "+inf")
        )
        addresses = [_text(entry) for entry in listed]
        since = now_ms - int(window * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for address in addresses:
                pipe.zcount(self.keys.auth_count(address), since, "+inf")
            failures = await self._call("auth read", pipe.execute()) if addresses else []
        return {a: int(n) for a, n in zip(addresses, failures, strict=True) if int(n)}

    async def auth_count(self, ip: str, window: float) -> int:
        """This address's authentication failures in the last `window` seconds."""
        since = self.now_ms() - int(window * 1000)
        return int(
            await self._call(
                "auth read", self.redis.zcount(self.keys.auth_count(ip), since, "+inf")
            )
        )

    async def bans_by_hour(self, hours: int = 24) -> list[tuple[float, int]]:
        """(start of the hour, unix s; bans counted in it), for the last `hours` hours,
        oldest first, this hour last; hours without a ban are there with 0."""
        raw = await self._call("bans per hour read", self.redis.hgetall(self.keys.bans_by_hour))
        counts = {_text(k): _text(v) for k, v in raw.items()}
        this_hour = self.now_ms() // 3_600_000
        out = []
        for hour in range(this_hour - hours + 1, this_hour + 1):
            text = counts.get(str(hour), "0")
            out.append((hour * 3600.0, int(text) if text.isascii() and text.isdigit() else 0))
        return out

    async def record(self, ip: str) -> dict[str, str]:
        """Everything we know of one address: its ban record (possibly empty)."""
        raw = await self._call("record read", self.redis.hgetall(self.keys.record(ip)))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def count(self, ip: str) -> int:
        now_ms = self.now_ms()
        window_start = now_ms - int(self.policy.window * 1000)
        return int(
            await self._call(
                "count read", self.redis.zcount(self.keys.count(ip), window_start, "+inf")
            )
        )

    async def totals(self) -> dict[str, int]:
        """The cluster's counters; a field that is not a whole number is left out."""
        return (await self.read_totals())[0]

    async def read_totals(self) -> tuple[dict[str, int], dict[str, str]]:
        """The counters, and apart from them (field -> its text, escaped) the fields
        something else wrote that are not whole numbers: shown as such, never a crash."""
        raw = await self._call("totals read", self.redis.hgetall(self.keys.stats))
        good: dict[str, int] = {}
        bad: dict[str, str] = {}
        for key, value in raw.items():
            text = _text(value)
            try:
                good[_text(key)] = int(text)
            except ValueError:
                bad[_text(key)] = _escaped(text)
        return good, bad

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
                events.append((_text(event_id), {_text(k): _text(v) for k, v in fields.items()}))
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
        return _text(rows[0][0]) if rows else None

    async def last_event_id(self) -> str:
        rows = await self._call("event read", self.redis.xrevrange(self.keys.events, count=1))
        return _text(rows[0][0]) if rows else "0-0"

    async def notify_lease(self, hook: str, token: str, lease: float, keep: float) -> bool:
        """Take or renew `hook`'s sender lease for `lease` seconds (its cursor kept
        `keep` seconds); False while another process holds it."""
        keys = [self.keys.notify_lease(hook), self.keys.notify_cursor(hook)]
        args = [token, int(lease * 1000), int(keep * 1000)]
        return bool(await self._call("notify lease", self._notify_lease(keys=keys, args=args)))

    async def notify_owner(self, hook: str) -> str | None:
        """Who holds `hook`'s sender lease now (its token, `<random>@<pbx_id>`), or None."""
        value = await self._call("notify read", self.redis.get(self.keys.notify_lease(hook)))
        return None if value is None else _text(value)

    async def notify_cursor(self, hook: str) -> str | None:
        """The last event `hook`'s receiver got, or None (no sender yet, or long ago)."""
        value = await self._call("notify read", self.redis.get(self.keys.notify_cursor(hook)))
        return None if value is None else _text(value)

    async def notify_advance(self, hook: str, token: str, event_id: str, keep: float) -> bool:
        """Move `hook`'s cursor to `event_id` if the lease is still `token`'s."""
        keys = [self.keys.notify_lease(hook), self.keys.notify_cursor(hook)]
        args = [token, event_id, int(keep * 1000)]
        return bool(await self._call("notify cursor", self._notify_cursor(keys=keys, args=args)))

    async def notify_release(self, hook: str, token: str) -> None:
        """Give `hook`'s lease up if it is `token`'s (a sender that stops)."""
        keys = [self.keys.notify_lease(hook)]
        await self._call("notify release", self._notify_release(keys=keys, args=[token]))

    async def heartbeat(self, info: dict[str, Any]) -> None:
        """Record that this PBX's agent is alive, for `status` ("agents seen")."""
        payload = json.dumps({**info, "pbx_id": self.pbx_id, "time": self.now()})
        await self._call("heartbeat", self.redis.hset(self.keys.agents, self.pbx_id, payload))

    async def agents(self) -> dict[str, dict[str, Any]]:
        """Each agent's last heartbeat; an entry that is not one (not a JSON object, a
        time or count that is not a number) is `{"unreadable": its text, escaped}`."""
        raw = await self._call("agents read", self.redis.hgetall(self.keys.agents))
        return {_text(k): _heartbeat(_text(v)) for k, v in raw.items()}

    async def embedded_state(self) -> dict[str, str]:
        """The embedded store's saving (persist.py): path, saved_at (ms), error."""
        raw = await self._call("state read", self.redis.hgetall(self.keys.embedded_state))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def redis_facts(self) -> RedisFacts:
        """The Redis version and its persistence settings, each read as far as allowed:
        CONFIG GET first (the settings), else INFO persistence (whether the append-only
        file is on). A refusal is recorded, not raised; an unreachable Redis raises."""
        refused: list[str] = []

        async def allowed(what: str, awaitable: Any) -> Any:
            try:
                return await awaitable
            except ResponseError as error:
                if "hello" in str(error).lower():  # the connection itself: RESP3 unknown
                    raise StoreError(f"Redis {what} failed: {error}") from None
                refused.append(f"{what} refused ({error})")
                return None
            except (RedisError, RedisClusterException, OSError) as error:
                raise StoreError(f"Redis {what} failed: {error or type(error).__name__}") from None

        server = await allowed("INFO", self.redis.info("server"))
        version = str(server.get("redis_version")) if server else None
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save"):
            reply = await allowed("CONFIG GET", self.redis.config_get(name))
            if reply is None:
                break
            config.update({_text(k): _text(v) for k, v in reply.items()})
        appendonly = config["appendonly"] == "yes" if "appendonly" in config else None
        if appendonly is None:
            persistence = await allowed("INFO", self.redis.info("persistence"))
            if persistence and "aof_enabled" in persistence:
                appendonly = int(persistence["aof_enabled"]) == 1
        return RedisFacts(
            version,
            appendonly,
            config.get("appendfsync"),
            config.get("save"),
            tuple(dict.fromkeys(refused)),
        )

    # -- Redis's clock -------------------------------------------------------------

    async def sync_clock(self) -> float:
        """Measure how far Redis's TIME is ahead of this host's clock (the midpoint of
        the round trip); every reader of ban ends uses it, so a PBX whose clock is off
        by an hour still holds a ban for its true remaining time. Call it at connect
        and now and then (the agent: every heartbeat)."""
        before = self.clock()
        seconds, micros = await self._call("TIME", self.redis.time())
        after = self.clock()
        self.clock_offset = int(seconds) + int(micros) / 1e6 - (before + after) / 2
        return self.clock_offset

    def now(self) -> float:
        """Redis's time as of the last sync_clock(), in unix seconds."""
        return self.clock() + self.clock_offset

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    async def nodes(self) -> list[str]:
        """The hosts of the Redis nodes behind this client that the config does not name:
        a Cluster's nodes, Sentinel's master and replicas (for the protected set)."""
        if isinstance(self.redis, ClusterClient):
            await self._call("cluster nodes", self.redis.initialize())
            return [node.host for node in self.redis.get_nodes()]
        pool = self.redis.connection_pool
        manager = getattr(pool, "sentinel_manager", None)
        if manager is None:
            return []
        master = await self._call("sentinel read", manager.discover_master(pool.service_name))
        replicas = await self._call("sentinel read", manager.discover_slaves(pool.service_name))
        return [host for host, _port in [master, *replicas]]

    async def ping(self) -> None:
        await self._call("ping", self.redis.ping())

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        # Bounded: a pool whose blocking XREAD was cancelled can wait on its lock forever.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.redis.aclose(), 1.0)
