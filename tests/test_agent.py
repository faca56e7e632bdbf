"""The ban agent on the dry-run backend with a real Redis: events, reconcile, expiry."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import fakeredis
import fakeredis.aioredis

from fastagi.addresses import AddressSet
from fastagi.agent import Agent
from fastagi.firewall.dryrun import DryRunFirewall
from fastagi.keys import Keys
from fastagi.service import make_embedded_store
from fastagi.store import Policy, Store, redis_client
from tests.harness import firewall_ips, settings, wait_until

IGNORE = AddressSet.parse(["192.0.2.0/24"])


def _store(url: str, pbx: str = "pbx1") -> Store:
    config = settings(url)
    return Store(redis_client(config.redis), Keys(), Policy(3, 600, 3600, 2.0, 86400), pbx)


def test_ban_and_unban_events_reach_the_firewall_fast(redis_url):
    async def main():
        store, firewall = _store(redis_url), DryRunFirewall()
        agent = Agent(store, firewall, sync_interval=30, ignore=IGNORE, block_ms=100)
        task = asyncio.create_task(agent.run())
        await wait_until(lambda: agent.last_id != "0-0" or agent._next_sync > 0)
        started = time.monotonic()
        for _ in range(3):
            await store.screen("198.51.100.1")
        banned_in = await wait_until(lambda: "198.51.100.1" in firewall_ips(firewall))
        latency = time.monotonic() - started
        await store.ban("2001:db8::1", 60, "manual")
        v6 = await wait_until(lambda: "2001:db8::1" in firewall_ips(firewall))
        await store.unban(["198.51.100.1"])
        lifted = await wait_until(lambda: "198.51.100.1" not in firewall_ips(firewall))
        await asyncio.sleep(0.1)
        heartbeat = await store.agents()
        agent.stop()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        return banned_in, latency, v6, lifted, heartbeat, firewall_ips(firewall)

    banned_in, latency, v6, lifted, heartbeat, left = asyncio.run(main())
    assert banned_in and v6 and lifted
    assert latency < 0.5
    assert "pbx1" in heartbeat and heartbeat["pbx1"]["backend"] == "dry-run"
    assert left == {"2001:db8::1"}  # stopping the agent leaves bans in place


def test_reconcile_at_start_and_never_an_ignored_address(redis_url):
    async def main():
        store = _store(redis_url)
        await store.ban("198.51.100.2", 600, "manual")
        await store.ban("198.51.100.3", 600, "manual")
        # an ignored address on the shared list (another PBX's config differs)
        await store.ban("192.0.2.10", 600, "manual")
        firewall = DryRunFirewall()
        firewall.add({ipaddress.ip_address("198.51.100.99"): time.time() + 600})  # stale
        agent = Agent(store, firewall, sync_interval=30, ignore=IGNORE)
        await agent.step()
        await store.close()
        return firewall_ips(firewall)

    assert asyncio.run(main()) == {"198.51.100.2", "198.51.100.3"}


def test_bans_expire_locally_while_redis_is_down(own_redis):
    async def main():
        store, firewall = _store(own_redis.url), DryRunFirewall()
        agent = Agent(store, firewall, sync_interval=30, ignore=IGNORE, block_ms=50)
        await store.ban("198.51.100.4", 1.0, "short")
        await store.ban("198.51.100.5", 600, "long")
        await agent.step()
        before = firewall_ips(firewall)
        own_redis.stop()
        task = asyncio.create_task(agent.run())
        expired = await wait_until(lambda: "198.51.100.4" not in firewall_ips(firewall), timeout=4)
        kept = "198.51.100.5" in firewall_ips(firewall)
        own_redis.start()  # empty: a wipe, not an unban; the agent writes its ban back
        written_back = False
        for _ in range(80):
            if "198.51.100.5" in await store.banned():
                written_back = True
                break
            await asyncio.sleep(0.1)
        still = firewall_ips(firewall)
        agent.stop()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        return before, expired, kept, written_back, still

    before, expired, kept, written_back, still = asyncio.run(main())
    assert before == {"198.51.100.4", "198.51.100.5"}
    assert expired and kept and written_back
    assert still == {"198.51.100.5"}


def test_agent_that_missed_trimmed_events_reconciles(redis_url):
    async def main():
        store, firewall = _store(redis_url), DryRunFirewall()
        agent = Agent(store, firewall, sync_interval=3600, ignore=IGNORE, block_ms=10)
        await store.ban("198.51.100.6", 600, "x")
        await agent.step()
        # events move on and the old ones are trimmed away while the agent is away
        await store.ban("198.51.100.7", 600, "x")
        await store.redis.xtrim(Keys().events, maxlen=0)
        await store.ban("198.51.100.8", 600, "x")
        await store.redis.xdel(Keys().events, (await store.first_event_id()))
        await store.ban("198.51.100.9", 600, "x")
        await agent.step()
        await store.close()
        return firewall_ips(firewall)

    assert asyncio.run(main()) == {"198.51.100.6", "198.51.100.7", "198.51.100.8", "198.51.100.9"}


def test_an_idle_embedded_agent_sends_no_command_and_misses_no_ban(tmp_path):
    """memory://: the agent looks at the stream 20 times a second without a command
    (an idle service's CPU), yet a ban from the screening step, one written by another
    client (as `fastagi-ctl ban` through the control socket) and a stream trimmed while
    it was away all reach the firewall."""

    async def main():
        server = fakeredis.FakeServer()
        store = make_embedded_store(settings("memory://"), server)
        other = Store(
            fakeredis.aioredis.FakeRedis(server=server), Keys(), Policy(3, 600, 3600, 2, 86400), "x"
        )
        firewall = DryRunFirewall()
        agent = Agent(store, firewall, sync_interval=3600, ignore=IGNORE, block_ms=None)
        commands = []
        send = store.redis.execute_command

        async def counted(*args, **options):
            commands.append(args[0])
            return await send(*args, **options)

        store.redis.execute_command = counted
        await agent.step()  # the first look at start
        commands.clear()
        for _ in range(20):
            await agent.step()
        idle = list(commands)
        threshold = settings("memory://").screening.threshold
        for _ in range(threshold):
            await store.screen("198.51.100.20")
        await agent.step()
        await other.ban("198.51.100.21", 600, "manual")
        await agent.step()
        await other.ban("198.51.100.22", 600, "manual")
        await other.redis.xtrim(Keys().events, maxlen=0)
        await other.ban("198.51.100.23", 600, "manual")
        await agent.step()
        await store.close()
        await other.close()
        return idle, firewall_ips(firewall)

    idle, applied = asyncio.run(main())
    assert not {"XREAD", "XRANGE"} & set(idle), idle  # a GET of the wipe token a second is fine
    assert applied == {"198.51.100.20", "198.51.100.21", "198.51.100.22", "198.51.100.23"}
