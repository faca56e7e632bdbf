"""Redis restarted with persistence (appendonly yes): bans, records (history) and the
event stream survive a SIGKILL, the service keeps serving without a restart, and the
agent (dry-run firewall) reconciles to the ban list once Redis is back.

Settings: `appendonly yes` with `appendfsync always` loses nothing acknowledged;
`everysec` (Redis's default) may lose the last second of bans on a crash of the host
(not of the process: the kernel still flushes the page cache of a killed process).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fastagi.addresses import AddressSet
from fastagi.agent import Agent
from fastagi.emulator import Call
from fastagi.firewall.dryrun import DryRunFirewall
from tests.conftest import REDIS_SERVER, RedisProcess
from tests.harness import firewall_ips, running_server, wait_until

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_bans_history_and_events_survive_a_killed_redis(tmp_path, fsync):
    server = RedisProcess(tmp_path, extra=("--appendonly", "yes", "--appendfsync", fsync))
    server.start()
    try:
        _scenario(server, fsync)
    finally:
        if server.proc is not None:
            server.proc.kill()
            server.proc.wait(5)


def _scenario(server: RedisProcess, fsync: str) -> None:
    async def main():
        async with running_server(
            server.url, SCREENING_IGNORE="", SCREENING_THRESHOLD="3", SERVER_SESSION_TIMEOUT="2s"
        ) as srv:
            firewall = DryRunFirewall()
            agent = Agent(
                srv.store, firewall, sync_interval=30, ignore=AddressSet.parse([]), block_ms=100
            )
            task = asyncio.create_task(agent.run())
            # Two bans by screening (one of them a repeat offender), one manual.
            for ip in ("198.51.100.1", "198.51.100.2"):
                for _ in range(3):
                    await srv.call(Call(source=ip))
            await srv.store.unban(["198.51.100.2"])
            for _ in range(3):
                await srv.call(Call(source="198.51.100.2"))  # ban #2: escalated
            await srv.store.ban("2001:db8::7", 3600, "manual")
            for _ in range(2):
                await srv.call(Call(source="198.51.100.3"))  # counted, not banned
            assert await wait_until(lambda: len(firewall_ips(firewall)) == 3, 3)
            before = {
                "banned": await srv.store.banned(),
                "records": {
                    ip: await srv.store.record(ip)
                    for ip in ("198.51.100.1", "198.51.100.2", "2001:db8::7")
                },
                "count": await srv.store.count("198.51.100.3"),
                "totals": await srv.store.totals(),
                "last_event": await srv.store.last_event_id(),
            }
            if fsync == "everysec":
                await asyncio.sleep(1.2)  # let the once-a-second fsync happen
            # SIGKILL: no shutdown save; only the append-only file remains.
            server.proc.kill()
            server.proc.wait(5)
            down = await srv.call(Call(source="198.51.100.9"))
            await asyncio.sleep(0.5)  # the agent sees the gap
            await asyncio.to_thread(server.start)
            after_restart = time.monotonic()
            # The service follows without a restart (its pool reconnects).
            up = None
            for _ in range(50):
                up = await srv.call(Call(source="198.51.100.10"))
                if up.variables.get("SCREEN_RESULT") == "COUNTED":
                    break
                await asyncio.sleep(0.1)
            await srv.store.ban("203.0.113.50", 600, "after restart")
            caught_up = await wait_until(
                lambda: (
                    firewall_ips(firewall)
                    == {"198.51.100.1", "198.51.100.2", "2001:db8::7", "203.0.113.50"}
                ),
                10,
            )
            catch_up = time.monotonic() - after_restart
            after = {
                "banned": await srv.store.banned(),
                "records": {ip: await srv.store.record(ip) for ip in before["records"]},
                "count": await srv.store.count("198.51.100.3"),
                "totals": await srv.store.totals(),
                "last_event": await srv.store.last_event_id(),
            }
            agent.stop()
            await asyncio.gather(task, return_exceptions=True)
            return before, after, down, up, caught_up, catch_up, agent.full_reconciles

    before, after, down, up, caught_up, catch_up, full = asyncio.run(main())
    print(
        f"\npersistence ({fsync}): {len(before['banned'])} bans and their records survived;"
        f" agent caught up {catch_up:.2f}s after the restart ({full} full reconciles)"
    )
    assert down.variables["SCREEN_RESULT"] == "ERROR"  # fail open while Redis is down
    assert up is not None and up.variables["SCREEN_RESULT"] == "COUNTED"
    for ip, until in before["banned"].items():
        assert after["banned"].get(ip) == pytest.approx(until)
    assert after["records"] == before["records"]
    assert before["records"]["198.51.100.2"].get("bans") == "2"  # history: escalated ban
    assert after["count"] == before["count"] == 2
    assert after["totals"]["calls"] >= before["totals"]["calls"]
    assert after["last_event"] > before["last_event"] or after["last_event"] == before["last_event"]
    assert caught_up


def test_every_pooled_connection_survives_a_redis_restart(tmp_path):
    """Regression: the store gave the asyncio client the *sync* `redis.retry.Retry`, whose
    call_with_retry returns the coroutine without awaiting it, so the promised retry
    never happened: after a Redis restart every stale pooled connection failed one call
    (here: StoreError "Connection closed by server")."""
    from fastagi.keys import Keys
    from fastagi.store import Policy, Store, StoreError, redis_client
    from tests.harness import settings

    server = RedisProcess(tmp_path, extra=("--appendonly", "yes"))
    server.start()

    async def main():
        store = Store(
            redis_client(settings(server.url).redis),
            Keys(),
            Policy(3, 600, 3600, 2.0, 86400),
            "pbx",
        )
        await asyncio.gather(*(store.ping() for _ in range(20)))  # 20 pooled connections
        server.proc.kill()
        server.proc.wait(5)
        await asyncio.to_thread(server.start)
        results = await asyncio.gather(*(store.banned() for _ in range(20)), return_exceptions=True)
        await store.close()
        return [r for r in results if isinstance(r, StoreError)]

    try:
        failed = asyncio.run(main())
    finally:
        server.proc.kill()
        server.proc.wait(5)
    assert failed == []
