"""A PBX whose clock is off still holds each ban for its true remaining time: ban ends
come from Redis's TIME, and the agent counts down on Redis's clock (the store's
measured offset), not on its own. Redis is real; the PBX's clock is patched."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest
import redis

from fastagi.addresses import AddressSet, target_text
from fastagi.agent import Agent
from fastagi.keys import Keys
from fastagi.store import Policy, Store, redis_client
from tests.harness import settings
from tests.recording_firewall import RecordingFirewall

TOLERANCE = 2.0  # seconds: a round trip and a step, not a clock's offset


def _redis_now(url: str) -> float:
    seconds, micros = redis.Redis.from_url(url).time()
    return seconds + micros / 1e6


def _pbx_store(url: str, skew: float, pbx: str = "pbx-skew") -> Store:
    """This PBX's store, on a clock `skew` seconds off (Redis keeps the true one)."""
    return Store(
        redis_client(settings(url).redis),
        Keys(),
        Policy(3, 600, 3600, 2.0, 86400),
        pbx,
        clock=lambda: time.time() + skew,
    )


@pytest.mark.parametrize("skew", [-3600.0, -3000.0, 3000.0, 4000.0, 3600.0])
def test_bans_applied_for_their_true_remaining_time(redis_url, skew):
    async def main():
        store = _pbx_store(redis_url, skew)
        firewall = RecordingFirewall(store.clock)
        agent = Agent(store, firewall, 30, AddressSet.parse([]), block_ms=20)
        try:
            hour_end = await store.ban("198.51.100.1", 3600, "on the list at start")
            await agent.step()  # the reconcile at start
            listed = _redis_now(redis_url)
            ten_min_end = await store.ban("2001:db8::2", 600, "an event")
            short_end = await store.ban("198.51.100.3", 1, "a short one")
            await agent.step()
            evented = _redis_now(redis_url)
            held_short = ipaddress.ip_network("198.51.100.3") in firewall.bans
            while _redis_now(redis_url) < short_end + 0.2:  # Redis's clock, not ours
                await asyncio.sleep(0.05)
            await agent.step()  # local expiry, on Redis's clock
            return (
                firewall.remaining,
                hour_end - listed,
                ten_min_end - evented,
                held_short,
                set(map(target_text, firewall.bans)),
            )
        finally:
            await store.close()

    remaining, true_hour, true_ten, held_short, held = asyncio.run(main())
    assert abs(remaining[ipaddress.ip_network("198.51.100.1")] - true_hour) < TOLERANCE
    assert abs(remaining[ipaddress.ip_network("2001:db8::2")] - true_ten) < TOLERANCE
    assert held_short  # a 1 s ban is applied, not dropped as already over
    assert held == {"198.51.100.1", "2001:db8::2"}  # and lifted when Redis's second is up


def test_heartbeat_shows_the_count_right_after_an_apply(redis_url):
    async def main():
        store = _pbx_store(redis_url, 0.0, pbx="pbx-beat")
        agent = Agent(store, RecordingFirewall(), 30, AddressSet.parse([]), block_ms=20)
        try:
            await agent.step()
            at_start = (await store.agents())["pbx-beat"]["applied"]
            await store.ban("198.51.100.4", 600, "x")
            await store.ban("198.51.100.5", 600, "x")
            await agent.step()
            after_apply = (await store.agents())["pbx-beat"]["applied"]
            await store.unban(["198.51.100.4"])
            await agent.step()
            after_unban = (await store.agents())["pbx-beat"]["applied"]
            return at_start, after_apply, after_unban
        finally:
            await store.close()

    assert asyncio.run(main()) == (0, 2, 1)


def test_the_offset_is_not_skewed_by_one_slow_round_trip(redis_url):
    """The first TIME of a fresh connection waits for the connect too (a loaded box: a
    tenth of a second and more); its midpoint is that far off. Here the first round trip
    looks 0.4 s long: alone it would put Redis's clock 0.2 s behind this host's."""
    readings = iter([-0.4])

    async def main():
        store = Store(
            redis_client(settings(redis_url).redis),
            Keys(),
            Policy(3, 600, 3600, 2.0, 86400),
            "pbx-rtt",
            clock=lambda: time.time() + next(readings, 0.0),
        )
        try:
            return await store.sync_clock()
        finally:
            await store.close()

    assert abs(asyncio.run(main())) < 0.05  # same host: the true offset is 0
