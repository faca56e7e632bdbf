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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry  # the asyncio one: the sync Retry never retries a coroutine
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from fastagi import lua
from fastagi.config import RedisConfig, ScreeningConfig
from fastagi.keys import Keys
from fastagi.redis_cluster import ClusterClient, cluster_client
from fastagi.redis_link import SharedLink

log = logging.getLogger("fastagi.store")

EVENTS_MAXLEN = 10_000  # agents further behind than this do a full reconcile
UNBAN_BATCH = 500
BAN_LIST_PAGE = 5000  # ban list entries per Redis read
MAX_PAGES = 1000  # 5,000,000 bans: a bound, not a limit anyone reaches
POOL_SIZE = 64  # one event loop needs few; more only queue inside Redis
PRUNE_EVERY = 64  # screening steps per sweep of expired ban and counted list entries


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
        self.count_prefix, self.record_prefix = keys.per_address_prefixes()
        self.shared_keys = tuple(
            encode(k) for k in (keys.banned, keys.counted, keys.events, keys.stats)
        )
        self.rules = tuple(
            encode(v)
            for v in (
                p.threshold,
                int(p.window * 1000),
                int(p.ban_time * 1000),
                p.ban_time_factor,
                int(p.ban_time_max * 1000),
                pbx_id,
                "threshold",
            )
        )
        self.tail = (encode(EVENTS_MAXLEN), encode(p.history_ms))
        # A call's member in its address's sorted set: unique per call, cluster-wide,
        # without a random draw (a getrandom() system call) per call.
        self.member_prefix = secrets.token_hex(8).encode() + b"-"
        self.steps = itertools.count()

    def command(self, sha: str, ip: str, injected: bool) -> tuple:
        address = ip.encode()
        step = next(self.steps)
        return (
            "EVALSHA",
            sha,
            6,
            self.count_prefix + address,
            self.record_prefix + address,
            *self.shared_keys,
            address,
            *self.rules,
            b"%s%x" % (self.member_prefix, step),
            *self.tail,
            b"1" if injected else b"0",
            b"1" if step % PRUNE_EVERY == 0 else b"0",  # which steps sweep expired entries
        )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _escaped(text: str, limit: int = 80) -> str:
    """Text from Redis that is not ours, safe for one line of output."""
    return text[:limit].encode("unicode_escape").decode("ascii")


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
        link: SharedLink | None = None,
    ) -> None:
        self.redis = client
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
        self._auth_failure = client.register_script(lua.AUTH_FAILURE)

    async def _call(self, what: str, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, RedisClusterException, OSError) as error:
            raise StoreError(f"Redis {what} failed: {error or type(error).__name__}") from None

    def _step_keys(self, ip: str) -> list[str]:
        k = self.keys
        return [k.count(ip), k.record(ip), k.banned, k.counted, k.events, k.stats]

    async def screen(self, ip: str, injected: bool = False) -> Verdict:
        """Count one call from `ip` and ban it at the threshold, atomically, cluster-wide;
        `injected` also counts an injection attempt, in the same round trip."""
        command = self._screen_parts.command(self._screen.sha, ip, injected)
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

    async def ban(self, ip: str, duration: float | None, reason: str) -> float:
        """Ban `ip` now for `duration` seconds (None: the escalating ban_time); its end."""
        p = self.policy
        args = [
            ip,
            int((duration or 0) * 1000),
            int(p.ban_time * 1000),
            p.ban_time_factor,
            int(p.ban_time_max * 1000),
            self.pbx_id,
            reason,
            EVENTS_MAXLEN,
            p.history_ms,
        ]
        if not self.wait_replicas:
            until = await self._call("ban", self._ban(keys=self._step_keys(ip), args=args))
            return int(until) / 1000.0
        async with self._one_connection("ban") as conn:
            until = await self._call(
                "ban", self._ban(keys=self._step_keys(ip), args=args, client=conn)
            )
            await self._replicated(conn, ip)
        return int(until) / 1000.0

    async def unban(self, ips: Iterable[str]) -> list[str]:
        """Lift these bans everywhere and reset their counts; the addresses that were banned."""
        lifted: list[str] = []
        batch = list(ips)
        for start in range(0, len(batch), UNBAN_BATCH):
            chunk = batch[start : start + UNBAN_BATCH]
            k = self.keys
            keys = [k.banned, k.counted, k.events, k.stats]
            for ip in chunk:
                keys += [k.count(ip), k.record(ip)]
            result = await self._call(
                "unban", self._unban(keys=keys, args=[self.pbx_id, EVENTS_MAXLEN, *chunk])
            )
            lifted += [_text(ip) for ip in result]
        return lifted

    async def unban_all(self) -> list[str]:
        return await self.unban(list(await self.banned()))

    async def banned(self) -> dict[str, float]:
        """The ban list: address -> ban end (unix s), expired entries left out.

        Read in pages: one 100,000-entry reply takes longer than `redis.timeout` to
        read and parse. Pages follow the score (the ban end) with an offset among
        equal scores, so entries added or removed meanwhile shift nothing already read.
        """
        low, offset = f"({int(time.time() * 1000)}", 0
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
        now_ms = int(time.time() * 1000)
        return int(
            await self._call(
                "ban list count", self.redis.zcount(self.keys.banned, f"({now_ms}", "+inf")
            )
        )

    async def counted(self) -> dict[str, int]:
        """Addresses counted in their current window, with their counts."""
        now_ms = int(time.time() * 1000)
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
        args = [
            ip,
            rules.threshold,
            int(rules.window * 1000),
            int(rules.ban_time * 1000),
            rules.ban_time_factor,
            int(rules.ban_time_max * 1000),
            self.pbx_id,
            "auth",
            secrets.token_hex(8),
            EVENTS_MAXLEN,
            rules.history_ms,
        ]
        return _verdict(await self._call("auth step", self._auth_failure(keys=keys, args=args)))

    async def auth_counted(self, window: float) -> dict[str, int]:
        """Addresses with authentication failures in the last `window` seconds (the
        [auth] one), with how many, for `status`."""
        now_ms = int(time.time() * 1000)
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
        since = int(time.time() * 1000) - int(window * 1000)
        return int(
            await self._call(
                "auth read", self.redis.zcount(self.keys.auth_count(ip), since, "+inf")
            )
        )

    async def record(self, ip: str) -> dict[str, str]:
        """Everything we know of one address: its ban record (possibly empty)."""
        raw = await self._call("record read", self.redis.hgetall(self.keys.record(ip)))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def count(self, ip: str) -> int:
        now_ms = int(time.time() * 1000)
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

    async def first_event_id(self) -> str | None:
        """The oldest event still kept; an agent whose last id is older missed some."""
        rows = await self._call("event read", self.redis.xrange(self.keys.events, count=1))
        return _text(rows[0][0]) if rows else None

    async def last_event_id(self) -> str:
        rows = await self._call("event read", self.redis.xrevrange(self.keys.events, count=1))
        return _text(rows[0][0]) if rows else "0-0"

    async def heartbeat(self, info: dict[str, Any]) -> None:
        """Record that this PBX's agent is alive, for `status` ("agents seen")."""
        payload = json.dumps({**info, "pbx_id": self.pbx_id, "time": time.time()})
        await self._call("heartbeat", self.redis.hset(self.keys.agents, self.pbx_id, payload))

    async def agents(self) -> dict[str, dict[str, Any]]:
        """Each agent's last heartbeat; an entry that is not one (not a JSON object, a
        time or count that is not a number) is `{"unreadable": its text, escaped}`."""
        raw = await self._call("agents read", self.redis.hgetall(self.keys.agents))
        return {_text(k): _heartbeat(_text(v)) for k, v in raw.items()}

    async def ping(self) -> None:
        await self._call("ping", self.redis.ping())

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        # Bounded: a pool whose blocking XREAD was cancelled can wait on its lock forever.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.redis.aclose(), 1.0)
