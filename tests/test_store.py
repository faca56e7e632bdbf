"""The atomic Lua steps, on fakeredis (the embedded store runs this same code)."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import fakeredis.aioredis

from fastagi.keys import Keys
from fastagi.store import PRUNE_EVERY, Policy, Store


def _store(policy: Policy | None = None) -> Store:
    client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    return Store(client, Keys("t:"), policy or Policy(3, 600, 3600, 2.0, 86400), "pbx-t")


def test_only_the_threshold_call_makes_the_ban():
    async def main():
        store = _store()
        return [await store.screen("192.0.2.1") for _ in range(5)], await store.events_after("0")

    verdicts, events = asyncio.run(main())
    assert [v.new_ban for v in verdicts] == [False, False, True, False, False]
    assert [v.count for v in verdicts] == [1, 2, 3, 4, 5]
    assert [e[1]["op"] for e in events] == ["ban"]
    assert events[0][1]["pbx_id"] == "pbx-t" and events[0][1]["ip"] == "192.0.2.1"


def test_window_slides_calls_older_than_the_window_drop_out():
    async def main():
        store = _store(Policy(3, 1.0, 3600, 2.0, 86400))
        first = [await store.screen("192.0.2.2") for _ in range(2)]
        await asyncio.sleep(1.1)
        later = await store.screen("192.0.2.2")
        return first, later

    first, later = asyncio.run(main())
    assert [v.count for v in first] == [1, 2]
    assert later.result == "COUNTED" and later.count == 1


def test_manual_ban_for_a_duration_and_unban_resets_everything():
    async def main():
        store = _store()
        await store.screen("2001:db8::2")
        until = await store.ban("2001:db8::2", 90, "manual")
        banned = await store.banned()
        lifted = await store.unban(["2001:db8::2", "192.0.2.99"])
        after = await store.screen("2001:db8::2")
        events = [e[1]["op"] for e in await store.events_after("0")]
        return until, banned, lifted, after, events, await store.totals()

    until, banned, lifted, after, events, totals = asyncio.run(main())
    assert abs(until - (time.time() + 90)) < 2
    assert list(banned) == ["2001:db8::2"]
    assert lifted == ["2001:db8::2"]  # the other address was not banned
    assert after.result == "COUNTED" and after.count == 1
    assert events == ["ban", "unban"]
    assert totals["bans"] == 1 and totals["unbans"] == 1


def test_expired_bans_leave_the_ban_list():
    async def main():
        store = _store()
        await store.ban("192.0.2.3", 0.3, "short")
        before = await store.banned()
        await asyncio.sleep(0.4)
        return before, await store.banned(), await store.screen("192.0.2.3")

    before, after, verdict = asyncio.run(main())
    assert list(before) == ["192.0.2.3"] and after == {}
    assert verdict.result == "COUNTED"


def test_counted_lists_addresses_in_their_window_with_counts():
    async def main():
        store = _store()
        for ip, n in (("192.0.2.4", 2), ("192.0.2.5", 1)):
            for _ in range(n):
                await store.screen(ip)
        return await store.counted()

    assert asyncio.run(main()) == {"192.0.2.4": 2, "192.0.2.5": 1}


def test_an_expired_ban_left_on_the_list_between_sweeps_bans_nothing():
    """Expired entries are swept every PRUNE_EVERY-th step; until then every reader and
    the step itself must treat them as gone."""

    async def main():
        store = _store()
        await store.screen("192.0.2.30")  # step 0 sweeps; the next ones do not
        await store.ban("192.0.2.31", 0.2, "short")
        await asyncio.sleep(0.3)
        verdict = await store.screen("192.0.2.31")
        left = await store.redis.zscore(store.keys.banned, "192.0.2.31")
        for n in range(2, PRUNE_EVERY + 1):  # up to and including the next sweep
            await store.screen(f"198.51.100.{n}")
        swept = await store.redis.zscore(store.keys.banned, "192.0.2.31")
        return verdict, left, await store.banned(), swept

    verdict, left, banned, swept = asyncio.run(main())
    assert left is not None  # really between sweeps
    assert verdict.result == "COUNTED" and verdict.count == 1 and not verdict.new_ban
    assert "192.0.2.31" not in banned
    assert swept is None
