"""The atomic Lua steps, on fakeredis; and the embedded store's Python screening step
(embedded.NativeScreen) against the Lua step, reply for reply and key for key."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import fakeredis.aioredis
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastagi import lua
from fastagi.embedded import NativeScreen, _Fallback
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


# -- the Python step against the Lua step ---------------------------------------------

KEYS = Keys("t:")
WINDOW_MS = 1000
ADDRESSES = ["192.0.2.1", "192.0.2.2", "2001:db8::/64"]
_operations = st.one_of(
    st.tuples(
        st.just("screen"),
        st.sampled_from(ADDRESSES),
        st.booleans(),  # injected
        st.booleans(),  # prune
        st.booleans(),  # the member of an earlier call again
    ),
    st.tuples(st.just("wait"), st.integers(0, 2 * WINDOW_MS)),
    # a ban (or a past one still listed) from elsewhere: an admin, another PBX
    st.tuples(st.just("listed"), st.sampled_from(ADDRESSES), st.integers(-500, 5000)),
    # data the script trips on, or almost
    st.tuples(
        st.just("odd"),
        st.sampled_from(ADDRESSES),
        st.sampled_from(["count-string", "calls-text", "calls-big", "record-count"]),
    ),
)


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.123456

    def __call__(self) -> float:
        return self.now


def _screen_args(ip: str, member: bytes, injected: bool, prune: bool, threshold: int) -> tuple:
    """lua.SCREEN's KEYS and ARGV, as store._ScreenParts encodes them."""
    keys = (
        KEYS.count(ip),
        KEYS.record(ip),
        KEYS.banned,
        KEYS.counted,
        KEYS.events,
        KEYS.stats,
        KEYS.holds(ip),
        KEYS.bans_by_hour,
    )
    argv = (ip, threshold, WINDOW_MS, 60_000, 2.0, 600_000, "pbx-t", "threshold", member)
    argv += (10_000, 600_000, int(injected), int(prune), "")  # "": no country (geo.py)
    encode = lambda value: str(value).encode()  # noqa: E731
    return tuple(encode(k) for k in keys), tuple(encode(a) for a in argv)


def _odd(client: redis.Redis, ip: str, what: str) -> None:
    if what == "count-string":
        client.set(KEYS.count(ip), "x")
    elif what == "calls-text":
        client.hset(KEYS.stats, "calls", "12x")
    elif what == "calls-big":
        client.hset(KEYS.stats, "calls", str(2**63 - 1))
    else:
        client.hset(KEYS.record(ip), "count", "007")


def _everything(client: redis.Redis) -> dict:
    """Every key: its type, value and expiry (ms)."""
    out = {}
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        if kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"stream":
            value = [fields for _, fields in client.xrange(key)]
        else:
            value = client.get(key)
        out[key] = (kind, value, client.pexpiretime(key))
    return out


def _run(call, *args) -> object:
    try:
        return call(*args)
    except redis.ResponseError as error:
        return ("error", str(error).split(":")[0])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(_operations, max_size=40), threshold=st.integers(1, 4))
def test_python_step_is_the_lua_step_reply_for_reply_and_key_for_key(monkeypatch, ops, threshold):
    """The same calls, waits and odd data on two stores: one runs lua.SCREEN, the other
    NativeScreen (which hands the ban and odd data to the script): the same replies and,
    after every step, the same keys, values and expiries."""
    clock = _Clock()
    monkeypatch.setattr(time, "time", clock)  # fakeredis's TIME and command clock too
    lua_server, native_server = fakeredis.FakeServer(), fakeredis.FakeServer()
    lua_client = fakeredis.FakeRedis(server=lua_server)
    native_client = fakeredis.FakeRedis(server=native_server)
    native = NativeScreen(native_server, None)
    native.clock = clock
    sha = lua_client.script_load(lua.SCREEN)
    native_client.script_load(lua.SCREEN)
    members: list[bytes] = []
    for op in ops:
        if op[0] == "wait":
            clock.now += op[1] / 1000
            continue
        if op[0] == "listed":
            for client in (lua_client, native_client):
                client.zadd(KEYS.banned, {op[1]: int(clock.now * 1000) + op[2]})
            continue
        if op[0] == "odd":
            for client in (lua_client, native_client):
                _odd(client, op[1], op[2])
            continue
        _, ip, injected, prune, again = op
        member = members[-1] if again and members else f"m{len(members)}".encode()
        members.append(member)
        keys, argv = _screen_args(ip, member, injected, prune, threshold)
        expected = _run(lua_client.evalsha, sha, len(keys), *keys, *argv)
        try:
            got = native.step(keys, argv)
        except _Fallback:  # as NativeScreen.execute does: the script decides
            got = _run(native_client.evalsha, sha, len(keys), *keys, *argv)
        assert got == expected, op
        assert _everything(native_client) == _everything(lua_client), op


def test_python_step_serves_the_common_calls_and_the_script_the_ban(monkeypatch):
    """The Python step really runs (no Lua for a counted or already banned call) and
    hands over to the script exactly the call that reaches the threshold."""
    clock = _Clock()
    monkeypatch.setattr(time, "time", clock)
    server = fakeredis.FakeServer()

    class Client:  # the store's client, counting what reaches it
        scripts = 0

        async def execute_command(self, *command):
            Client.scripts += 1
            return await fakeredis.aioredis.FakeRedis(server=server).execute_command(*command)

    native = NativeScreen(server, Client())
    native.clock = clock
    sha = fakeredis.FakeRedis(server=server).script_load(lua.SCREEN)

    async def main():
        outcomes = []
        for n in range(5):
            keys, argv = _screen_args("192.0.2.7", f"m{n}".encode(), False, n == 0, 3)
            before = Client.scripts
            reply = await native.execute("EVALSHA", sha, len(keys), *keys, *argv)
            outcomes.append((reply[0].decode(), reply[1], Client.scripts - before))
        return outcomes

    assert asyncio.run(main()) == [
        ("COUNTED", 1, 0),
        ("COUNTED", 2, 0),
        ("BANNED", 3, 1),
        ("BANNED", 4, 0),
        ("BANNED", 5, 0),
    ]
