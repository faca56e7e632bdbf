"""Redis HA with real processes: a master, a replica and three redis-sentinel processes
on loopback. During a load of screened calls and bans the master is SIGKILLed (twice:
the restarted old master rejoins as a replica, then the new master is killed):

- no session outlives session_timeout (a dead master gives ERROR fast, fail open);
- the service follows the new master without a restart (`[redis] sentinels`);
- no ban acknowledged before a failover is lost: `[redis] wait_replicas = 1` makes the
  store WAIT until the replica holds each new ban before the call is answered.

Settings this needs (documented for deployments): `[redis] sentinels`,
`sentinel_service`, `wait_replicas = 1` (WAIT after each ban; Redis replication is
asynchronous, so without it a ban written just before the kill can be lost);
`appendonly yes` on every node so a restarted node keeps its data;
`down-after-milliseconds` above any stall (a flap can promote a replica that has not
synced yet: Sentinel's limit, not ours; 0.5 s flapped here under load). `min-replicas-to-write`
is NOT needed for this guarantee and with a single replica it would refuse every write
after a failover until the old master rejoins.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from fastagi.emulator import Call
from tests.conftest import RedisProcess, wait_ping
from tests.harness import free_port, redis_nodes_protected, running_server, settings

SENTINEL = shutil.which("redis-sentinel")
REDIS_SERVER = shutil.which("redis-server")
SESSION_TIMEOUT = 2.0
FAILOVERS = int(os.environ.get("FASTAGI_FAILOVERS", "2"))
pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


class Node(RedisProcess):
    """A cluster node: persistent (appendonly), fast diskless replication."""

    def __init__(self, workdir: Path, name: str) -> None:
        (workdir / name).mkdir()
        super().__init__(
            workdir / name,
            extra=(
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ),
        )

    def start(self, replicaof: int | None = None) -> None:  # type: ignore[override]
        super().start(*(["--replicaof", "127.0.0.1", str(replicaof)] if replicaof else []))


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes = [Node(workdir, "a"), Node(workdir, "b")]
        self.sentinels: list[subprocess.Popen] = []
        self.sentinel_ports: list[int] = []

    def start(self) -> None:
        a, b = self.nodes
        a.start()
        b.start(replicaof=a.port)
        for n in range(3):
            port = free_port()
            conf = self.workdir / f"sentinel-{n}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor mymaster 127.0.0.1 {a.port} 2\n"
                "sentinel down-after-milliseconds mymaster 2000\n"
                "sentinel failover-timeout mymaster 2000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
            binary = [SENTINEL, str(conf)] if SENTINEL else [REDIS_SERVER, str(conf), "--sentinel"]
            self.sentinels.append(
                subprocess.Popen(binary, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            self.sentinel_ports.append(port)
        for port in self.sentinel_ports:
            wait_ping(port)
        self.wait_replicated(a.port, timeout=15)

    def master_port(self) -> int:
        client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
        _host, port = client.sentinel_get_master_addr_by_name("mymaster")
        return int(port)

    def failovers(self) -> int:
        """How many failovers the sentinels made (the config epoch counts them)."""
        client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
        return int(client.sentinel_master("mymaster")["config-epoch"])

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def wait_replicated(self, master: int, timeout: float) -> None:
        """Until the master sees one online replica (then sentinels learn it from INFO).

        The master is asked of the sentinels each time: on a loaded machine they may
        still move the role after the failover we waited for."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            try:
                master = self.master_port()
                info = redis.Redis(port=master, socket_timeout=1).info("replication")
                replica = info.get("slave0") or {}
                if info.get("connected_slaves", 0) >= 1 and replica.get("state") == "online":
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no replica of {master} within {timeout}s: {info}")

    def close(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinels:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.close()


def test_failover_under_load_loses_no_ban_and_never_holds_a_call(cluster):
    sentinels = ",".join(f"127.0.0.1:{p}" for p in cluster.sentinel_ports)
    acked: dict[str, float] = {}  # bans the dialplan was told about (BANNED), with ends
    durations: list[float] = []
    results: dict[str, int] = {}
    failovers: list[float] = []

    async def caller(srv, worker: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set() and n < 10_000:
            ip = f"198.{18 + worker}.{n // 250}.{n % 250 + 1}"  # never this host's (protected)
            n += 1
            for _ in range(5):  # threshold 5: the fifth call bans
                started = time.monotonic()
                result = await srv.call(Call(source=ip))
                durations.append(time.monotonic() - started)
                verdict = result.variables.get("SCREEN_RESULT", "none")
                results[verdict] = results.get(verdict, 0) + 1
                if verdict == "BANNED" and ip not in acked:
                    acked[ip] = float(result.variables.get("SCREEN_BAN_UNTIL", 0))
                if stop.is_set():
                    break

    async def main():
        async with running_server(
            "redis://127.0.0.1:1/0",
            REDIS_SENTINELS=sentinels,
            REDIS_SENTINEL_SERVICE="mymaster",
            REDIS_TIMEOUT="200ms",
            REDIS_WAIT_REPLICAS="1",
            REDIS_WAIT_TIMEOUT="100ms",
            SERVER_SESSION_TIMEOUT=f"{SESSION_TIMEOUT}s",
            SCREENING_IGNORE="",
            SERVER_MAX_SESSIONS="512",
        ) as srv:
            stop = asyncio.Event()
            workers = [asyncio.create_task(caller(srv, w, stop)) for w in range(16)]
            await asyncio.sleep(1.5)
            for _ in range(FAILOVERS):
                old = await asyncio.to_thread(cluster.master_port)
                banned_before = len(acked)
                cluster.node(old).kill()
                killed_at = time.monotonic()
                deadline = killed_at + 15
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    try:
                        new = await asyncio.to_thread(cluster.master_port)
                    except redis.RedisError:
                        continue
                    if new != old:
                        break
                else:
                    raise AssertionError("no failover within 15 s")
                # The old master comes back at once as a replica of the new one.
                await asyncio.to_thread(cluster.node(old).start, new)
                # The service must be back on its own: a ban acked after the switch.
                while time.monotonic() < deadline and len(acked) <= banned_before + 20:
                    await asyncio.sleep(0.1)
                failovers.append(time.monotonic() - killed_at)
                assert len(acked) > banned_before + 20, "service did not follow the new master"
                await asyncio.to_thread(cluster.wait_replicated, new, 20)
                await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)
            unreplicated = set(srv.store.unreplicated_recent)
            banned_now = await srv.store.banned()
            return banned_now, unreplicated

    banned_now, unreplicated = asyncio.run(asyncio.wait_for(main(), 120))
    lost = [ip for ip, until in acked.items() if until > time.time() and ip not in banned_now]
    confirmed_lost = [ip for ip in lost if ip not in unreplicated]
    print(
        f"\nsentinel: {len(failovers)} failovers survived (service back after "
        f"{', '.join(f'{s:.1f}s' for s in failovers)}), {sum(results.values())} calls "
        f"{results}, {len(acked)} bans acked, {len(lost)} lost, {len(unreplicated)} "
        f"unconfirmed by WAIT (no replica attached yet), max session {max(durations):.3f}s"
    )
    assert len(failovers) == FAILOVERS
    assert max(durations) < SESSION_TIMEOUT + 0.5
    # Every ban WAIT confirmed on a replica survives; an unconfirmed one (the only
    # replica was itself the failed node) may be lost, and is logged as such.
    made = cluster.failovers()
    assert confirmed_lost == [], (
        f"{len(confirmed_lost)} replicated bans lost; the sentinels failed over {made} "
        f"times, the test {FAILOVERS} (an extra one may promote a replica not yet synced)"
    )
    assert results.get("BANNED", 0) > 40 and results.get("COUNTED", 0) > 160


def test_the_protected_set_asks_sentinel_for_the_master_and_its_replica(cluster):
    """The config names only the sentinels; the nodes behind them are protected too."""
    sentinels = ",".join(f"127.0.0.1:{p}" for p in cluster.sentinel_ports)
    config = settings("redis://127.0.0.1:1/0", REDIS_SENTINELS=sentinels)

    nodes, parts = asyncio.run(redis_nodes_protected(config))
    assert nodes == ["127.0.0.1", "127.0.0.1"]  # the master, then its replica
    assert parts["Redis nodes (by name)"] == ["127.0.0.1"]
