"""A ban is a set of holds, one per source: the longest wins, a source's unban lifts only
its own hold, an admin's unban lifts all. Each test runs on a real Redis and on the
embedded store's fakeredis (the same Lua)."""

from __future__ import annotations

import asyncio
import itertools
import time

import fakeredis
import fakeredis.aioredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastagi.agent import Agent
from fastagi.firewall.dryrun import DryRunFirewall
from fastagi.keys import Keys
from fastagi.store import ADMIN_HOLD, THRESHOLD_HOLD, Policy, Store, redis_client
from tests import harness

HOUR = 3600.0
POLICY = Policy(3, 600, HOUR, 2.0, 100 * HOUR)
SOURCES = [ADMIN_HOLD, THRESHOLD_HOLD, "f2b-asterisk", "f2b-sip", "restored"]
_prefixes = itertools.count()


@pytest.fixture(params=["redis", "embedded"])
def make(request):
    """Stores with a fresh key prefix each, on real Redis or on fakeredis; built inside
    the test's event loop."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    server = fakeredis.FakeServer()

    def store() -> Store:
        if url:
            client = redis_client(harness.settings(url).redis)
        else:
            client = fakeredis.aioredis.FakeRedis(server=server)
        return Store(client, Keys(f"h{next(_prefixes)}:"), POLICY, "pbx-h")

    return store


def _run(make, main, *args):
    """main(store, *args) on a new store, closed after."""

    async def wrapper():
        store = make()
        try:
            return await main(store, *args)
        finally:
            await store.close()

    return asyncio.run(wrapper())


async def _state(store: Store, target: str) -> tuple[float | None, dict[str, float]]:
    return (await store.banned()).get(target), {
        h.source: h.until for h in await store.holds(target)
    }


def test_the_longer_of_two_bans_wins_in_either_order(make):
    async def main(store, first, second):
        await store.ban("198.51.100.1", *first)
        await store.ban("198.51.100.1", *second)
        return await _state(store, "198.51.100.1")

    week, minute = (7 * 24 * HOUR, "manual"), (60, "f2b-asterisk", "f2b-asterisk")
    for first, second in ((week, minute), (minute, week)):
        until, holds = _run(make, main, first, second)
        assert until == pytest.approx(time.time() + 7 * 24 * HOUR, abs=5)
        assert set(holds) == {ADMIN_HOLD, "f2b-asterisk"}
        assert holds["f2b-asterisk"] == pytest.approx(time.time() + 60, abs=5)


def test_a_source_never_shortens_its_own_hold(make):
    async def main(store):
        long = await store.hold("198.51.100.2", "f2b-asterisk", "x", duration=HOUR)
        short = await store.hold("198.51.100.2", "f2b-asterisk", "x", duration=60)
        return long, short, await _state(store, "198.51.100.2"), await store.events_after("0")

    long, short, (until, holds), events = _run(make, main)
    assert long.placed and not short.placed
    assert short.until == short.hold_until == long.until == until == holds["f2b-asterisk"]
    assert [e["op"] for _, e in events] == ["ban"]


def test_a_sources_unban_keeps_an_admins_and_a_thresholds_ban(make):
    async def main(store):
        for _ in range(POLICY.threshold):
            verdict = await store.screen("198.51.100.3")
        await store.ban("198.51.100.4", 2 * HOUR, "manual")
        for ip in ("198.51.100.3", "198.51.100.4"):
            await store.hold(ip, "f2b-asterisk", "f2b-asterisk", duration=60)
        lifted = await store.lift(["198.51.100.3", "198.51.100.4"], "f2b-asterisk")
        return verdict, lifted, await store.banned(), [await store.holds(ip) for ip in lifted]

    verdict, lifted, banned, holds = _run(make, main)
    assert verdict.new_ban
    assert all(result.held and not result.ended for result in lifted.values())
    assert banned["198.51.100.3"] == pytest.approx(verdict.ban_until, abs=0.01)
    assert banned["198.51.100.4"] == pytest.approx(time.time() + 2 * HOUR, abs=5)
    assert [[h.source for h in hs] for hs in holds] == [[THRESHOLD_HOLD], [ADMIN_HOLD]]


def test_lifting_the_longest_hold_shortens_the_ban_for_the_agents_too(make):
    """The event carries the new end, and an agent applies it (dry-run firewall)."""

    async def main(store):
        agent = Agent(
            store, DryRunFirewall(), sync_interval=30, ignore=harness.settings().screening.ignore
        )
        await agent.step()
        await store.ban("198.51.100.5", 2 * HOUR, "manual")
        short = await store.hold("198.51.100.5", "f2b-asterisk", "jail", duration=600)
        before = (await store.record("198.51.100.5"))["reason"]
        lifted = (await store.lift(["198.51.100.5"], ADMIN_HOLD))["198.51.100.5"]
        await agent.apply(await store.events_after("0"))
        return (
            short,
            lifted,
            {str(a): u for a, u in agent.applied.items()},
            await store.events_after("0"),
            (before, await store.record("198.51.100.5")),
        )

    short, lifted, applied, events, (before, record) = _run(make, main)
    assert lifted.held and not lifted.ended and lifted.until == short.hold_until
    # the record tells the reason of the hold that makes the ban
    assert before == "manual" and record["reason"] == "jail"
    assert int(record["until"]) / 1000 == short.hold_until
    assert applied == {"198.51.100.5": short.hold_until}
    assert [(e["op"], e["reason"]) for _, e in events] == [("ban", "manual"), ("ban", "jail")]


def test_an_admin_unban_lifts_every_hold_and_resets_the_count(make):
    async def main(store):
        for _ in range(POLICY.threshold):
            await store.screen("2001:db8::6")
        await store.ban("2001:db8::6", 2 * HOUR, "manual")
        await store.hold("2001:db8::6", "f2b-asterisk", "f2b", duration=60)
        lifted = await store.unban(["2001:db8::6"])
        after = await store.screen("2001:db8::6")
        ops = [e["op"] for _, e in await store.events_after("0")]
        return lifted, await _state(store, "2001:db8::6"), after, ops

    lifted, (until, holds), after, ops = _run(make, main)
    assert lifted == ["2001:db8::6"]
    assert until is None and holds == {}
    assert after.result == "COUNTED" and after.count == 1
    assert ops == ["ban", "ban", "unban"]  # the admin's longer hold moved the end once


def test_the_ban_ends_with_its_longest_hold_and_the_holds_go_with_it(make):
    async def main(store):
        await store.hold("198.51.100.7", "f2b-asterisk", "x", duration=0.2)
        await store.hold("198.51.100.7", ADMIN_HOLD, "x", duration=0.5)
        await asyncio.sleep(0.7)
        gone = await store.redis.exists(store.keys.holds("198.51.100.7"))
        return await _state(store, "198.51.100.7"), gone, await store.screen("198.51.100.7")

    state, gone, verdict = _run(make, main)
    assert state == (None, {}) and gone == 0  # the hash expired with its longest hold
    assert verdict.result == "COUNTED"


def test_an_ended_shorter_hold_is_skipped_then_swept_and_keeps_nothing_banned(make):
    async def main(store):
        await store.hold("198.51.100.8", "f2b-asterisk", "x", duration=0.2)
        await store.hold("198.51.100.8", ADMIN_HOLD, "x", duration=HOUR)
        await asyncio.sleep(0.3)
        listed = [h.source for h in await store.holds("198.51.100.8")]
        fields = await store.redis.hlen(store.keys.holds("198.51.100.8"))
        lifted = await store.lift(["198.51.100.8"], ADMIN_HOLD)
        return listed, fields, lifted["198.51.100.8"], await _state(store, "198.51.100.8")

    listed, fields, lifted, state = _run(make, main)
    assert listed == [ADMIN_HOLD]
    assert fields == 2  # the ended hold stays in the hash until the next write drops it
    assert lifted.ended and state == (None, {})


def test_escalation_counts_every_ban_whatever_its_source(make):
    async def main(store):
        await store.ban("198.51.100.9", 60, "f2b", "f2b-asterisk")
        await store.unban(["198.51.100.9"])
        for _ in range(POLICY.threshold):
            verdict = await store.screen("198.51.100.9")
        return verdict, await store.record("198.51.100.9")

    verdict, record = _run(make, main)
    # one earlier ban: ban_time * factor
    assert verdict.ban_until - time.time() == pytest.approx(2 * HOUR, abs=5)
    assert record["bans"] == "2" and record["reason"] == THRESHOLD_HOLD


@pytest.mark.parametrize("hold_first", [False, True])
def test_a_ban_written_without_a_hold_is_kept_as_a_legacy_hold(make, hold_first):
    """As before holds existed, or by an older version during a rolling upgrade (its own
    ban list entry and record, beside a running hold): nothing here shortens it."""

    async def main(store):
        end_ms = int((time.time() + HOUR) * 1000)
        if hold_first:
            await store.hold("198.51.100.10", "f2b-asterisk", "x", duration=60)
        await store.redis.zadd(store.keys.banned, {"198.51.100.10": end_ms})  # as before
        await store.redis.hset(store.keys.record("198.51.100.10"), "reason", "old")
        listed = await store.holds("198.51.100.10")
        await store.hold("198.51.100.10", "f2b-asterisk", "x", duration=60)
        lifted = await store.lift(["198.51.100.10"], "f2b-asterisk")
        return end_ms / 1000, listed, lifted["198.51.100.10"], await _state(store, "198.51.100.10")

    end, listed, lifted, (until, holds) = _run(make, main)
    assert (listed[0].source, listed[0].until, listed[0].reason) == ("legacy", end, "old")
    assert lifted.held and not lifted.ended
    assert until == end and holds == {"legacy": end}


def test_a_restored_hold_keeps_the_ban_count(make):
    """The write-back after Redis lost its data: an absolute end, no new ban counted."""

    async def main(store):
        end = int(time.time() + HOUR) + 0.123
        placed = await store.hold("198.51.100.11", "restored", "restored", until=end, counts=False)
        return end, placed, await store.record("198.51.100.11"), await store.totals()

    end, placed, record, totals = _run(make, main)
    assert placed.until == placed.hold_until == end
    assert "bans" not in record and "bans" not in totals
    assert int(record["until"]) == int(end * 1000)


# An operation: (source, hours from a base far enough ahead that nothing expires, reason)
# to hold, (source, None, _) to lift one source's hold, (None, None, _) for an admin's
# unban of all. Reasons are any text: the store keeps them beside the end in one field.
OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(SOURCES), st.integers(1, 6), st.text(max_size=12)),
        st.tuples(st.sampled_from(SOURCES), st.none(), st.none()),
        st.tuples(st.none(), st.none(), st.none()),
    ),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_the_ban_is_its_longest_hold_whatever_the_sequence(make, ops):
    """Against a model: source -> (end, reason), a hold never shortened, the ban = the
    longest, an event exactly when the ban's end changes."""
    target = "2001:db8:1:2::/64"  # the store never looks at the target's shape

    async def main(store):
        base = int(time.time() + 100 * HOUR)
        model: dict[str, tuple[float, str]] = {}
        last_event = "0-0"
        for source, hours, reason in ops:
            before = max((end for end, _ in model.values()), default=None)
            if hours is not None:
                end = base + hours * HOUR
                await store.hold(target, source, reason, until=end)
                if end > model.get(source, (0, ""))[0]:
                    model[source] = (end, reason)
            else:
                await store.lift([target], source)
                model = {} if source is None else {s: h for s, h in model.items() if s != source}
            after = max((end for end, _ in model.values()), default=None)
            until = (await store.banned()).get(target)
            holds = {h.source: (h.until, h.reason) for h in await store.holds(target)}
            assert until == after and holds == model
            events = await store.events_after(last_event)
            if events:
                last_event = events[-1][0]
            if after == before:
                assert events == []
            elif after is None:
                assert [e["op"] for _, e in events] == ["unban"]
            else:
                assert [(e["op"], int(e["until"])) for _, e in events] == [
                    ("ban", int(after * 1000))
                ]

    _run(make, main)


def test_a_hold_waits_for_replicas_like_a_ban(redis_url):
    """With wait_replicas, the hold is placed and WAITed for on one connection; a Redis
    without replicas cannot confirm it, which is counted and logged."""

    async def main():
        config = harness.settings(redis_url)
        store = Store(redis_client(config.redis), Keys(), POLICY, "pbx-w", wait=(1, 0.05))
        try:
            placed = await store.hold("198.51.100.12", "f2b-asterisk", "x", duration=60)
            return placed, store.unreplicated_bans, await store.banned()
        finally:
            await store.close()

    placed, unreplicated, banned = asyncio.run(main())
    assert placed.placed and banned == {"198.51.100.12": placed.until}
    assert unreplicated == 1
