"""A shared Redis that lost its data is healed by the agents, not obeyed: two agents on a
real Redis (dry-run firewalls, in this process) keep what they applied through a
FLUSHALL and a restart without persistence, write it back (the longer end wins when
they heal at once), and still lift bans on an explicit unban or `unban --all`.

The same with nftables and real processes in namespaces: tests/test_restart_netns.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Callable

import pytest

from fastagi.addresses import AddressSet
from fastagi.agent import Agent
from fastagi.firewall.dryrun import DryRunFirewall
from fastagi.keys import Keys
from fastagi.store import Policy, Store, redis_client
from tests.harness import firewall_ips, settings, wait_until

SYNC = 0.5  # sync_interval of the agents here
KEYS = Keys()
BANS = {"198.51.100.1": 600, "198.51.100.2": 900, "2001:db8::7": 1200}


def _store(url: str, pbx: str) -> Store:
    return Store(redis_client(settings(url).redis), KEYS, Policy(3, 600, 3600, 2.0, 86400), pbx)


@contextlib.asynccontextmanager
async def two_agents(url: str) -> AsyncIterator[tuple[Store, list[Agent]]]:
    """An admin's store and two running agents (pbx1, pbx2) with dry-run firewalls."""
    admin = _store(url, "admin")
    agents = [
        Agent(_store(url, pbx), DryRunFirewall(), SYNC, AddressSet.parse([]), block_ms=100)
        for pbx in ("pbx1", "pbx2")
    ]
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        yield admin, agents
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for agent in agents:
            await agent.store.close()
        await admin.close()


def applied(agent: Agent) -> set[str]:
    return firewall_ips(agent.firewall)


async def ban_all(admin: Store, agents: list[Agent]) -> dict[str, float]:
    ends = {ip: await admin.ban(ip, seconds, "manual") for ip, seconds in BANS.items()}
    assert await wait_until(lambda: all(applied(a) == set(BANS) for a in agents), 3)
    return ends


async def redis_holds(admin: Store, wanted: set[str], timeout: float) -> float | None:
    """Seconds until the ban list holds every one of `wanted` again (None: never)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if wanted <= set(await admin.banned()):
                return time.monotonic() - started
        except Exception:  # Redis still coming back
            pass
        await asyncio.sleep(0.02)
    return None


@contextlib.asynccontextmanager
async def watching(agents: list[Agent]) -> AsyncIterator[list[set[str]]]:
    """Every few ms, the union of what the firewalls lack of BANS: a ban that left any
    firewall at any moment shows up in the list."""
    missing: list[set[str]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            for agent in agents:
                if lost := set(BANS) - applied(agent):
                    missing.append(lost)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(watch())
    try:
        yield missing
    finally:
        stop.set()
        await task


async def _wiped_then_healed(url: str, wipe: Callable[[], None]) -> dict:
    async with two_agents(url) as (admin, agents):
        ends = await ban_all(admin, agents)
        token = await admin.epoch()
        async with watching(agents) as missing:
            await asyncio.to_thread(wipe)
            healed_in = await redis_holds(admin, set(BANS), SYNC + 6)
            restored = await admin.banned()
            records = {ip: await admin.record(ip) for ip in BANS}
            new_token = await admin.epoch()
            # after the heal, an unban is an unban: lifted everywhere, and stays lifted
            await admin.unban(["198.51.100.1"])
            lifted = await wait_until(
                lambda: all("198.51.100.1" not in applied(a) for a in agents), 3
            )
            await asyncio.sleep(3 * SYNC)
        return {
            "ends": ends,
            "token": token,
            "healed_in": healed_in,
            "restored": restored,
            "records": records,
            "new_token": new_token,
            "lifted": lifted,
            "still_lifted": all("198.51.100.1" not in applied(a) for a in agents),
            "banned_after_unban": set(await admin.banned()),
            "missing": [m - {"198.51.100.1"} for m in missing],
            "written_back": sum(a.written_back for a in agents),
        }


def _check_healed(out: dict, what: str, within: float) -> None:
    print(f"\n{what}: ban list whole again after {out['healed_in']:.2f}s")
    assert not any(out["missing"]), f"a ban left a firewall: {out['missing'][:3]}"
    assert out["healed_in"] is not None and out["healed_in"] <= within
    for ip, until in out["ends"].items():
        # the same end, not reset: the agent keeps ends on its host's clock, converted
        # back with an offset to Redis's clock measured within half a round trip
        assert out["restored"][ip] == pytest.approx(until, abs=0.05)
        assert out["records"][ip]["reason"] == "restored"
    assert out["new_token"] and out["new_token"] != out["token"]
    assert 1 <= out["written_back"] <= 2 * len(BANS)
    assert out["lifted"] and out["still_lifted"]
    assert out["banned_after_unban"] == set(BANS) - {"198.51.100.1"}


def test_flushall_is_healed_within_sync_interval(redis_url, redis_server):
    out = asyncio.run(_wiped_then_healed(redis_url, redis_server.client().flushall))
    _check_healed(out, "FLUSHALL", 2 * SYNC + 0.5)  # a look at the token every SYNC


def test_a_redis_restarted_empty_is_healed(own_redis):
    def restart_empty() -> None:
        own_redis.kill()
        time.sleep(0.3)  # the agents see the connection fail
        own_redis.start()

    out = asyncio.run(_wiped_then_healed(own_redis.url, restart_empty))
    # reconnect backoff (0.2 s doubling, here ~0.8 s) + one step
    _check_healed(out, "restart without persistence", 3.0)


def test_unban_all_is_not_a_wipe(redis_url):
    async def main():
        async with two_agents(redis_url) as (admin, agents):
            await ban_all(admin, agents)
            token = await admin.epoch()
            await admin.unban_all()
            emptied = await wait_until(lambda: all(applied(a) == set() for a in agents), 3)
            await asyncio.sleep(4 * SYNC)  # several periodic checks
            return (
                token,
                await admin.epoch(),
                emptied,
                [applied(a) for a in agents],
                await admin.banned(),
                sum(a.written_back for a in agents),
            )

    token, after, emptied, firewalls, banned, written = asyncio.run(main())
    assert token and after == token  # the unban kept the token
    assert emptied and firewalls == [set(), set()]
    assert banned == {} and written == 0


def test_agents_healing_at_once_agree_on_the_longer_end(redis_url, redis_server):
    """Two agents that applied different ends for the same address (one saw a later,
    longer ban) write back at the same moment: the longer end wins, whatever the order,
    and both keep one token."""

    async def main():
        admin = _store(redis_url, "admin")
        now = time.time()
        agents = []
        for pbx, end in (("pbx1", now + 600), ("pbx2", now + 1800)):
            agent = Agent(_store(redis_url, pbx), DryRunFirewall(), SYNC, AddressSet.parse([]))
            await agent.reconcile()  # the first look adopts (here: creates) the token
            agent.applied = {ipaddress.ip_network("198.51.100.9"): end}
            agents.append(agent)
        await asyncio.to_thread(redis_server.client().flushall)
        await asyncio.gather(*(agent._heal_if_wiped() for agent in agents))
        result = (
            await admin.banned(),
            {agent.epoch for agent in agents},
            await admin.epoch(),
            now,
        )
        for agent in (*agents,):
            await agent.store.close()
        await admin.close()
        return result

    banned, tokens, token, now = asyncio.run(main())
    # Each store measures its clock offset within half a TIME round trip.
    assert banned["198.51.100.9"] == pytest.approx(now + 1800, abs=0.25)
    assert tokens == {token}


def test_a_first_start_on_an_empty_redis_writes_nothing_back(redis_url):
    async def main():
        agent = Agent(_store(redis_url, "pbx1"), DryRunFirewall(), SYNC, AddressSet.parse([]))
        await agent.reconcile()
        await agent.reconcile()
        result = agent.written_back, agent.epoch, await agent.store.epoch()
        await agent.store.close()
        return result

    written, mine, token = asyncio.run(main())
    assert written == 0 and token and mine == token
