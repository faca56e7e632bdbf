"""The protected set for real: network namespaces, a Redis with a password, real firewalls.

    core      redis-server with requirepass on 192.0.2.1 and [2001:db8::1]
    pbx1/2    /etc/hosts says redis.test (both addresses) and trunk.test (192.0.2.60),
              resolv.conf names 192.0.2.53, default routes via 192.0.2.254 and
              2001:db8::254 (`ip netns exec` bind-mounts /etc/netns/<name>/*); the
              config names Redis and the trunk only by host name
    attacker  sends real datagrams

Must show 1: calls whose CHANNEL(recvip) is a Redis node, this host, a gateway, a
resolver or the `protect` trunk are never counted nor banned, logged once each.
Must show 2: the Redis node's addresses written into the shared ban list by hand (ZADD
and XADD) are not applied by the nftables and ipset agents, which stay connected: a
normal ban beside them, and a later one, drop the attacker's real packets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import NamespaceRedis, Topology
from tests.test_cluster_netns import (
    AGI_PORT,
    ATTACKER4,
    ATTACKER4_B,
    ATTACKER6,
    PBXS,
    SYNC,
    Cluster,
    _write_bans,
    kernel_bans,
    wait_for,
)

pytestmark = [pytest.mark.netns]

PASSWORD = "spoof-proof-7c1e"
HOSTS = "127.0.0.1 localhost\n192.0.2.1 redis.test\n2001:db8::1 redis.test\n192.0.2.60 trunk.test\n"
RESOLV = "nameserver 192.0.2.53\n"
GATEWAYS = ("192.0.2.254", "2001:db8::254")
REDIS_NODE = ("192.0.2.1", "2001:db8::1")
# what CHANNEL(recvip) says -> the part of the protected set that covers it (on pbx1)
PROTECTED_CALLERS = {
    "192.0.2.1": "Redis node redis.test",
    "2001:db8::1": "Redis node redis.test",
    "192.0.2.21": "this host's address",
    "2001:db8::21": "this host's address",
    "192.0.2.254": "a gateway of this host",
    "2001:db8::254": "a gateway of this host",
    "192.0.2.53": "a resolver of this host",
    "192.0.2.60": "trunk.test (screening.protect)",
}
# other spellings and special ranges a spoofer may try: ignored as well
SPOOFS = ("::ffff:192.0.2.254", "255.255.255.255", "0.0.0.0", "ff02::1", "fe80::1", "224.0.0.5")


class NamedCluster(Cluster):
    """The cluster of test_cluster_netns, configured by host names only."""

    def env(self, role: str, **extra: str) -> dict[str, str]:
        named = {
            "FASTAGI_REDIS_URL": self.redis.url(host="redis.test"),
            "FASTAGI_SCREENING_PROTECT": '["trunk.test"]',
            "FASTAGI_LOG_LEVEL": "DEBUG",
        }
        return super().env(role, **{**named, **extra})


@pytest.fixture(scope="module")
def cluster(netns_topology: Topology, tmp_path_factory) -> Iterator[NamedCluster]:
    topo = netns_topology
    work = tmp_path_factory.mktemp("protect")
    made_etc = not Path("/etc/netns").exists()
    for role in PBXS:
        etc = Path("/etc/netns") / topo[role].name  # this test's own namespace name
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(HOSTS)
        (etc / "resolv.conf").write_text(RESOLV)
        topo[role].run(["ip", "route", "add", "default", "via", GATEWAYS[0]])
        topo[role].run(["ip", "-6", "route", "add", "default", "via", GATEWAYS[1]])
        topo[role].udp_echo(5060)
    redis = NamespaceRedis(topo.core, str(work), password=PASSWORD)
    redis.start()
    try:
        yield NamedCluster(topo, redis, work)
    finally:
        redis.kill()
        for role in PBXS:
            shutil.rmtree(Path("/etc/netns") / topo[role].name, ignore_errors=True)
        if made_etc:
            shutil.rmtree("/etc/netns", ignore_errors=True)


def test_calls_from_protected_sources_are_never_counted_nor_banned(cluster: NamedCluster):
    c = cluster
    c.redis.client().flushall()
    log_path = c.logs / "serve.log"
    with open(log_path, "w") as log:
        serve = c.topo.pbx1.spawn(
            [sys.executable, "-m", "fastagi.cli", "serve", "--no-agent"],
            env=c.env("pbx1", FASTAGI_SCREENING_PROTECT_REFRESH="1s"),
            stdout=log,
            stderr=log,
        )
    hosts = Path("/etc/netns") / c.topo.pbx1.name / "hosts"
    try:
        c.topo.pbx1.wait_tcp("127.0.0.1", AGI_PORT, timeout=20)
        for source in [*PROTECTED_CALLERS, *SPOOFS]:
            out = c.ctl("simulate", "--ip", source, "--calls", "4").stdout
            assert out.count("SCREEN_REASON=protected SCREEN_RESULT=IGNORED") == 4, (source, out)
        control = c.ctl("simulate", "--ip", ATTACKER4, "--calls", "3").stdout
        assert "SCREEN_RESULT=BANNED" in control, control
        refused = c.ctl("ban", "192.0.2.1")
        status = json.loads(c.ctl("status", "--json").stdout)
        check = c.ctl("check").stdout
        # the trunk's name moves: the running service follows within protect_refresh
        hosts.write_text(HOSTS.replace("192.0.2.60", "192.0.2.61"))
        moved = wait_for(
            lambda: "SCREEN_REASON=protected" in c.ctl("simulate", "--ip", "192.0.2.61").stdout,
            10,
            0.2,
        )
    finally:
        hosts.write_text(HOSTS)
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(10)
    assert moved, "192.0.2.61 (trunk.test's new address) not protected after a refresh"
    assert refused.returncode == 2 and "Redis node redis.test" in refused.stderr, refused.stderr
    assert [ban["ip"] for ban in status["banned"]["list"]] == [ATTACKER4]
    assert status["calls"] == 3  # only the attacker's calls were counted
    parts = {part["source"]: part["entries"] for part in status["protected"]["parts"]}
    assert set(parts["Redis nodes (by name)"]) == set(REDIS_NODE)
    assert set(parts["gateways"]) == set(GATEWAYS)
    assert parts["resolvers"] == ["192.0.2.53"]
    assert parts["screening.protect (by name)"] == ["192.0.2.60"]
    assert {"192.0.2.21", "2001:db8::21"} <= set(parts["this host"])
    size = status["protected"]["size"]
    assert f"ok   protected: {size} addresses and networks never banned here" in check
    assert re.search(r"gateways: 2 \[/proc/net/route, /proc/net/ipv6_route\] 192\.0\.2\.254", check)
    assert "Redis nodes (by name): 2" in check and "resolvers: 1" in check, check
    text = log_path.read_text()
    for source, why in PROTECTED_CALLERS.items():
        lines = re.findall(rf"calls from {re.escape(source)} are not counted: .*", text)
        assert len(lines) == 1 and why in lines[0], (source, lines)
    assert "Traceback" not in text


@pytest.fixture(params=["nftables", "ipset"])
def agents(request, cluster: NamedCluster) -> Iterator[NamedCluster]:
    with cluster.agents_running(request.param):
        yield cluster


def test_the_redis_node_written_into_the_ban_list_by_hand_is_never_applied(agents):
    c = agents
    end_ms = int((time.time() + 600) * 1000)
    # what another PBX, or an admin with redis-cli, could write: ZADD banned + XADD events
    _write_bans(c.redis.client(), {**dict.fromkeys(REDIS_NODE, end_ms), ATTACKER4: end_ms})
    written = time.time()
    assert wait_for(lambda: c.all_dropped([ATTACKER4]), 5), c.agent_logs()
    # two sync intervals: periodic checks, none may see drift nor log the entries again
    time.sleep(2 * SYNC + 1)
    for role in PBXS:
        assert kernel_bans(c.topo[role], c.backend) == [ATTACKER4], c.agent_logs()
        # packets from the Redis host still pass
        assert c.topo.can_reach("core", role, 5060, 4) and c.topo.can_reach("core", role, 5060, 6)
    # still connected: a later ban reaches both PBXs, heartbeats go on
    assert c.ctl("ban", ATTACKER6, "--for", "10m", role="pbx2").returncode == 0
    assert wait_for(lambda: c.all_dropped([ATTACKER6]), 5), c.agent_logs()
    assert c.passes("pbx1", 4, ATTACKER4_B), "an address nobody banned is blocked"
    assert all(beat["time"] > written for beat in c.heartbeats().values())
    shown = c.ctl("status").stdout  # on pbx1: the entries it sets aside, and why
    assert "|- Protected (never banned here):" in shown
    for address in REDIS_NODE:
        assert re.search(rf"{re.escape(address)} until .*protected here, not applied", shown)
    for role in PBXS:
        log = (c.logs / f"agent-{c.backend}-{role}.log").read_text()
        for address in REDIS_NODE:
            skipped = re.findall(rf"agent: skipped .*[' =]{re.escape(address)}[ '].*", log)
            assert len(skipped) == 1 and "Redis node redis.test" in skipped[0], (role, skipped)
        assert "reconciled (difference)" not in log, f"{role}: drift seen at a periodic check"
        assert "Redis event read failed" not in log and "Traceback" not in log
