"""A bulk write's `sync` event, applied by batch (issue 18: 100,000 entries in one batch
within 2 s; the figure itself is bench/feed_import.py's): the agent applies just the
entries the write changed, from the batch the event names, in one nftables
transaction, without reading the whole ban list; an entry protected on this host is
left out and logged once; a batch that is gone makes it read the whole list instead.

The agent runs here, its nftables backend in pbx1's namespace (tests/fw_driver.py),
against a real redis-server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastagi.addresses import AddressSet, target_text
from fastagi.agent import Agent
from fastagi.firewall import FirewallSettings
from fastagi.protect import Part, Protected, Sources
from fastagi.service import make_store
from fastagi.store import FEED_EVENTS_MAX, Store, redis_client
from tests.fw_driver import FirewallDriver
from tests.harness import settings, wait_until
from tests.netns import Topology, netns_available, netns_topology  # noqa: F401

pytestmark = [pytest.mark.netns]

FEED = "feed:big"
COUNT = FEED_EVENTS_MAX + 200  # above it: one `sync` event instead of an event per ban
TARGETS = [f"10.77.{n >> 8}.{n & 255}" for n in range(COUNT)]
PROTECTED = TARGETS[7]  # this host's own, say: never applied here
ADMIN = TARGETS[8]  # banned for a day by an admin before the feed listed it


@pytest.fixture
def firewall(netns_topology: Topology) -> Iterator[FirewallDriver]:  # noqa: F811
    with FirewallDriver(netns_topology.pbx1, FirewallSettings(backend="nftables")) as fw:
        fw.setup()
        try:
            yield fw
        finally:
            fw.teardown()


def protected() -> Protected:
    part = Part("screening.protect", [(ipaddress.ip_network(PROTECTED), "screening.protect")])
    nothing = Sources(host=list, route_files=(Path("/nx"),) * 2, resolv_files=())
    return Protected([part], {}, sources=nothing)


class Reads:
    """Counts the agent's reads of the whole ban list."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        banned = store.banned

        async def counted() -> dict[str, float]:
            self.count += 1
            return await banned()

        store.banned = counted  # type: ignore[method-assign]


def stores(redis_url: str) -> tuple[Store, Store]:
    config = settings(redis_url)
    return tuple(  # type: ignore[return-value]
        make_store(config, redis_client(config.redis, caller_deadlines=True)) for _ in range(2)
    )


def skipped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]


def test_the_agent_applies_a_sync_batch_without_reading_the_list(
    redis_url: str, firewall: FirewallDriver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastagi.agent")

    async def main() -> tuple[dict[int, float], dict[str, float], int, int]:
        writer, reader = stores(redis_url)
        await writer.sync_clock()
        await writer.ban(ADMIN, 86400, "manual")
        agent = Agent(reader, firewall, 30, AddressSet([]), block_ms=50, protected=protected())
        reads = Reads(reader)
        task = asyncio.create_task(agent.run())
        first = ipaddress.ip_network(TARGETS[0])
        try:
            assert await wait_until(lambda: agent.full_reconciles == 1, 10)
            at_start = reads.count
            ends = {}
            for hold in (600, 1200):  # a first import, then a refresh lengthening each
                ends[hold] = writer.now() + hold
                await writer.feed_holds(TARGETS, FEED, FEED, ends[hold])
                end = ends[hold] - reader.clock_offset
                applied = lambda: abs(agent.applied.get(first, 0) - end) < 1  # noqa: B023, E731
                assert await wait_until(applied, 20)
            return ends, await writer.banned(), reads.count - at_start, agent.full_reconciles
        finally:
            agent.stop()
            await asyncio.gather(task, return_exceptions=True)
            await writer.close()
            await reader.close()

    ends, listed, reads, full = asyncio.run(main())
    kernel = firewall.list()
    # the ban list holds all of them; the kernel all but the protected one
    assert set(TARGETS) <= set(listed)
    assert set(kernel) == set(TARGETS) - {PROTECTED}
    # the refresh lengthened each ban in the kernel; the admin's day was not shortened
    assert kernel[TARGETS[0]] == pytest.approx(ends[1200], abs=5)
    assert kernel[ADMIN] == pytest.approx(listed[ADMIN], abs=5) and listed[ADMIN] > ends[1200]
    # by batch: neither sync event made the agent read the whole list
    assert reads == 0 and full == 1
    # the protected entry: left out at both sync events, logged once
    lines = [line for line in skipped_lines(caplog) if PROTECTED in line]
    assert len(lines) == 1 and "screening.protect" in lines[0], skipped_lines(caplog)


def test_a_batch_that_is_gone_makes_the_agent_read_the_whole_list(
    redis_url: str, firewall: FirewallDriver, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent that comes to a `sync` event after its batch expired (away longer than
    FEED_BATCH_KEEP) or from an older writer reads the whole list: nothing is lost."""
    caplog.set_level(logging.INFO, logger="fastagi.agent")

    async def main() -> tuple[int, int, set[str]]:
        writer, reader = stores(redis_url)
        agent = Agent(reader, firewall, 30, AddressSet([]), block_ms=50)
        reads = Reads(reader)
        try:
            await agent.step()  # its start: the whole list, then events
            assert agent.full_reconciles == 1
            await writer.sync_clock()
            await writer.feed_holds(TARGETS, FEED, FEED, writer.now() + 600)
            batches = [key async for key in writer.redis.scan_iter(match="*feed-batch:*")]
            assert len(batches) == 1
            await writer.redis.delete(*batches)  # expired meanwhile
            await agent.step()  # the sync event: its batch is gone
            await agent.step()  # so the whole list is read
            return reads.count, agent.full_reconciles, {target_text(t) for t in agent.applied}
        finally:
            await writer.close()
            await reader.close()

    reads, full, applied = asyncio.run(main())
    assert reads == 2 and full == 2
    assert applied == set(TARGETS)
    assert set(firewall.list()) == set(TARGETS)
    assert any("batch cannot be read" in r.getMessage() for r in caplog.records)
