"""What the store tells: the ban list, holds, records, counts, totals, agents (status,
the page, export, check). Read only."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from fastagi.redis_cluster import ClusterClient
from fastagi.store.base import (
    BAN_LIST_PAGE,
    DETAILS_PAGE,
    HEARTBEAT_INTERVAL,
    MAX_PAGES,
    STALE_BEATS,
    Hold,
    StoreBase,
    StoreError,
    as_text,
)
from fastagi.store.client import RedisFacts


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


def _escaped(text: str, limit: int = 80) -> str:
    """Text from Redis that is not ours, safe for one line of output."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def _running_holds(raw: dict, listed: float | None, record_reason: str, now: float) -> list[Hold]:
    """A holds hash as read from Redis: its running holds, longest first. A ban list end
    beyond every hold (written before holds existed) is the hold "legacy", as the
    scripts treat it."""
    out = []
    for source, value in raw.items():
        end, _, reason = as_text(value).partition(" ")
        if end.isdigit() and int(end) / 1000.0 > now:
            out.append(Hold(as_text(source), int(end) / 1000.0, reason))
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


class Reads(StoreBase):
    """The Store's read-only views."""

    async def holds(self, target: str) -> list[Hold]:
        """The running holds on `target`, longest first. A ban list end beyond every
        hold (written before holds existed) shows as the hold "legacy", as the scripts
        treat it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.holds(target))
            pipe.zscore(self.keys.banned, target)
            pipe.hget(self.keys.record(target), "reason")
            raw, listed, record_reason = await self._call("holds read", pipe.execute())
        return _running_holds(raw, listed, as_text(record_reason or ""), self.now())

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
                    as_text(k): as_text(v) for k, v in zip(fields[::2], fields[1::2], strict=True)
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
                out[as_text(ip)] = score / 1000.0
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
        ips = [as_text(ip) for ip in ips]
        if not ips:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for ip in ips:
                pipe.zcard(self.keys.count(ip))
            counts = await self._call("counts read", pipe.execute())
        return {ip: int(n) for ip, n in zip(ips, counts, strict=True) if n}

    async def auth_counted(self, window: float) -> dict[str, int]:
        """Addresses with authentication failures in the last `window` seconds (the
        [auth] one), with how many, for `status`."""
        now_ms = self.now_ms()
        listed = await self._call(
            "auth read", self.redis.zrangebyscore(self.keys.auth_counted, f"({now_ms}", "+inf")
        )
        addresses = [as_text(entry) for entry in listed]
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
        counts = {as_text(k): as_text(v) for k, v in raw.items()}
        this_hour = self.now_ms() // 3_600_000
        out = []
        for hour in range(this_hour - hours + 1, this_hour + 1):
            text = counts.get(str(hour), "0")
            out.append((hour * 3600.0, int(text) if text.isascii() and text.isdigit() else 0))
        return out

    async def record(self, ip: str) -> dict[str, str]:
        """Everything we know of one address: its ban record (possibly empty)."""
        raw = await self._call("record read", self.redis.hgetall(self.keys.record(ip)))
        return {as_text(k): as_text(v) for k, v in raw.items()}

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
            text = as_text(value)
            try:
                good[as_text(key)] = int(text)
            except ValueError:
                bad[as_text(key)] = _escaped(text)
        return good, bad

    async def heartbeat(self, info: dict[str, Any]) -> None:
        """Record that this PBX's agent is alive, for `status` ("agents seen")."""
        payload = json.dumps({**info, "pbx_id": self.pbx_id, "time": self.now()})
        await self._call("heartbeat", self.redis.hset(self.keys.agents, self.pbx_id, payload))

    async def agents(self) -> dict[str, dict[str, Any]]:
        """Each agent's last heartbeat; an entry that is not one (not a JSON object, a
        time or count that is not a number) is `{"unreadable": its text, escaped}`."""
        raw = await self._call("agents read", self.redis.hgetall(self.keys.agents))
        return {as_text(k): _heartbeat(as_text(v)) for k, v in raw.items()}

    async def embedded_state(self) -> dict[str, str]:
        """The embedded store's saving (persist.py): path, saved_at (ms), error."""
        raw = await self._call("state read", self.redis.hgetall(self.keys.embedded_state))
        return {as_text(k): as_text(v) for k, v in raw.items()}

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
            config.update({as_text(k): as_text(v) for k, v in reply.items()})
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
