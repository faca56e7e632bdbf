"""A cluster in network namespaces: one real Redis, two PBXs with real firewalls.

    core      redis-server on 192.0.2.1 and [2001:db8::1] (and a Unix socket for the test)
    pbx1      `fastagi-ctl agent` (Redis over IPv4), `fastagi-ctl serve --no-agent`,
              a UDP echo on 5060, a host firewall of its own
    pbx2      `fastagi-ctl agent` (Redis over IPv6), a UDP echo, a host firewall
    attacker  192.0.2.10-12, 2001:db8::10-12: sends real datagrams

For each kernel backend: a ban (threshold calls through `simulate`, and `ban`) drops
the attacker's packets on both PBXs and `unban` lets them through again, IPv4 and IPv6;
short bans expire on both PBXs with Redis killed; an agent SIGKILLed while applying
thousands of bans comes back to exactly the ban list; our chain/table/set removed behind
the agent's back is restored within sync_interval; `check` reports what works. The
hosts' own rules come out of every test exactly as they went in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastagi.firewall import FirewallSettings
from fastagi.keys import Keys
from tests.fw_driver import FirewallDriver
from tests.harness import wait_for
from tests.netns import (  # noqa: F401
    NamespaceRedis,
    Topology,
    netns_available,
    netns_topology,
    snapshot,
    without_ours,
)

pytestmark = [pytest.mark.netns]

BACKENDS = ["iptables", "nftables", "ipset"]
SYNC = 2.0  # firewall.sync_interval of the agents here
PBXS = ("pbx1", "pbx2")
AGI_PORT = 4573
ATTACKER4, ATTACKER4_B, ATTACKER4_C = "192.0.2.10", "192.0.2.11", "192.0.2.12"
ATTACKER6, ATTACKER6_B, ATTACKER6_C = "2001:db8::10", "2001:db8::11", "2001:db8::12"
KEYS = Keys()

HOST_FIREWALL = """
iptables-legacy -A INPUT -p tcp --dport 22 -j ACCEPT
ip6tables-legacy -A INPUT -p tcp --dport 22 -j ACCEPT
iptables -A INPUT -p tcp --dport 22 -j ACCEPT
ip6tables -A INPUT -p tcp --dport 22 -j ACCEPT
nft add table inet hostfw
nft add chain inet hostfw input '{ type filter hook input priority 0; policy accept; }'
nft add rule inet hostfw input tcp dport 22 accept
ipset create hostset hash:ip
"""
# behind the agent's back: pbx1 loses everything of ours, pbx2 a part
TAMPER = {
    "iptables": (
        "iptables-legacy -D INPUT -j FASTAGI; iptables-legacy -F FASTAGI; "
        "iptables-legacy -X FASTAGI; ip6tables-legacy -F FASTAGI",
        "iptables-legacy -F FASTAGI; ip6tables-legacy -F FASTAGI",
    ),
    "nftables": ("nft delete table inet fastagi", "nft flush chain inet fastagi input"),
    "ipset": (
        "iptables -F FASTAGI; ip6tables -F FASTAGI; "
        "ipset destroy fastagi-v4; ipset destroy fastagi-v6",
        "ipset flush fastagi-v4; ipset flush fastagi-v6",
    ),
}
# iptables keeps one rule per address and commits whole tables: 1,000 keeps the test
# quick (the bench holds 5,000); nftables and ipset take the full 10,000
BULK = {"iptables": 1_000, "nftables": 10_000, "ipset": 10_000}


def time_until(predicate: Callable[[], bool], timeout: float) -> float | None:
    """When (monotonic) the first evaluation of predicate that came out True began."""
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        if predicate():
            return began
        if began > deadline:
            return None
        time.sleep(0.01)


def kernel_bans(ns, backend: str) -> list[str]:
    """Every address in our chain/sets as the kernel has it, duplicates kept."""
    found: list[str] = []
    if backend == "iptables":
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            proc = ns.run([tool, "-w", "-S", "FASTAGI"], check=False, timeout=60)
            found += re.findall(
                r"^-A FASTAGI -s (\S+?)/\d+ (?:-m comment --comment \S+ )?-j DROP",
                proc.stdout,
                re.M,
            )
    elif backend == "nftables":
        for name in ("ban4", "ban6"):
            proc = ns.run(
                ["nft", "-j", "list", "set", "inet", "fastagi", name], check=False, timeout=60
            )
            for item in json.loads(proc.stdout or "{}").get("nftables", []):
                for elem in item.get("set", {}).get("elem", []):
                    found.append(elem["elem"]["val"] if isinstance(elem, dict) else elem)
    else:
        for name in ("fastagi-v4", "fastagi-v6"):
            proc = ns.run(["ipset", "save", name], check=False, timeout=60)
            found += re.findall(r"^add \S+ (\S+)", proc.stdout, re.M)
    return [str(ipaddress.ip_address(a)) for a in found]


class Cluster:
    def __init__(self, topo: Topology, redis: NamespaceRedis, logs: Path) -> None:
        self.topo = topo
        self.redis = redis
        self.logs = logs
        self.agents: dict[str, subprocess.Popen] = {}
        self.backend = "dry-run"

    def env(self, role: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}
        env.update(
            {
                # pbx2 reaches Redis over IPv6
                "FASTAGI_REDIS_URL": self.redis.url(6 if role == "pbx2" else 4),
                "FASTAGI_FIREWALL_BACKEND": self.backend,
                "FASTAGI_FIREWALL_SYNC_INTERVAL": f"{SYNC}s",
                "FASTAGI_SCREENING_PBX_ID": role,
                "FASTAGI_SCREENING_THRESHOLD": "3",
                # one ban per address: the attacker's addresses share a /64 with the PBXs
                # and Redis here (prefixes: tests/test_prefix_netns.py)
                "FASTAGI_SCREENING_IPV6_PREFIX": "128",
                "FASTAGI_SERVER_LISTEN": f"127.0.0.1:{AGI_PORT}",
            }
        )
        env.update(extra)
        return env

    def ctl(self, *args: str, role: str = "pbx1") -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "fastagi.cli", *args]
        return self.topo[role].run(cmd, check=False, timeout=60, env=self.env(role))

    def start_agent(self, role: str) -> None:
        log = open(self.logs / f"agent-{self.backend}-{role}.log", "a")  # noqa: SIM115
        self.agents[role] = self.topo[role].spawn(
            [sys.executable, "-m", "fastagi.cli", "agent"],
            env=self.env(role),
            stdout=log,
            stderr=log,
        )
        log.close()

    def heartbeats(self) -> dict[str, dict]:
        raw = self.redis.client().hgetall(KEYS.agents)
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def wait_agents(self, since: float, roles=PBXS, timeout: float = 20) -> None:
        """Heartbeats come after the first reconcile: the firewall is set up."""

        def ready() -> bool:
            beats = self.heartbeats()
            return all(r in beats and beats[r]["time"] >= since for r in roles)

        assert wait_for(ready, timeout, 0.1), f"agents not up: {self.agent_logs()}"

    @contextlib.contextmanager
    def agents_running(self, backend: str) -> Iterator[Cluster]:
        """Both agents running `backend` on a clean Redis; afterwards they are stopped
        and our firewall is removed."""
        self.backend = backend
        self.redis.client().flushall()
        started = time.time()
        try:
            for role in PBXS:
                self.start_agent(role)
            self.wait_agents(started)
            yield self
        finally:
            for role in list(self.agents):
                self.kill_agent(role, signal.SIGTERM)
            for role in PBXS:
                with FirewallDriver(self.topo[role], FirewallSettings(backend=backend)) as fw:
                    fw.teardown()

    def kill_agent(self, role: str, sig: int = signal.SIGKILL) -> None:
        proc = self.agents.pop(role)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(10)

    def agent_logs(self) -> str:
        out = []
        for path in sorted(self.logs.glob(f"agent-{self.backend}-*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(out)

    def passes(self, role: str, family: int, source: str | None = None) -> bool:
        return self.topo.can_reach("attacker", role, 5060, family, source=source, timeout=1.0)

    def dropped(self, role: str, family: int, source: str | None = None) -> bool:
        return not self.topo.can_reach("attacker", role, 5060, family, source=source, timeout=0.3)

    def all_dropped(self, sources: list[str]) -> bool:
        return all(self.dropped(r, fam(s), s) for r in PBXS for s in sources)

    def all_pass(self, sources: list[str], timeout: float = 1.0) -> bool:
        return all(
            self.topo.can_reach("attacker", r, 5060, fam(s), source=s, timeout=timeout)
            for r in PBXS
            for s in sources
        )


def fam(address: str) -> int:
    return 6 if ":" in address else 4


@pytest.fixture(scope="module")
def cluster(netns_topology: Topology, tmp_path_factory) -> Iterator[Cluster]:  # noqa: F811
    topo = netns_topology
    work = tmp_path_factory.mktemp("cluster")
    redis = NamespaceRedis(topo.core, str(work))
    redis.start()
    c = Cluster(topo, redis, work)
    for role in PBXS:
        topo[role].run(HOST_FIREWALL)
        topo[role].udp_echo(5060)
    for family in (4, 6):
        for role in PBXS:
            assert c.passes(role, family), f"topology broken: attacker -> {role} IPv{family}"
    log = open(work / "serve.log", "w")  # noqa: SIM115
    topo.pbx1.spawn(
        [sys.executable, "-m", "fastagi.cli", "serve", "--no-agent"],
        env=c.env("pbx1"),
        stdout=log,
        stderr=log,
    )
    log.close()
    topo.pbx1.wait_tcp("127.0.0.1", AGI_PORT, timeout=20)
    yield c
    redis.kill()


@pytest.fixture(params=BACKENDS)
def agents(request, cluster: Cluster) -> Iterator[Cluster]:
    """Both agents running `backend` on a clean Redis; afterwards our firewall is removed
    and the hosts' own rules must be exactly as before."""
    backend = request.param
    if cluster.redis.proc is None or cluster.redis.proc.poll() is not None:
        cluster.redis.start()
    before = {role: without_ours(snapshot(cluster.topo[role])) for role in PBXS}
    with cluster.agents_running(backend):
        yield cluster
    after = {role: without_ours(snapshot(cluster.topo[role])) for role in PBXS}
    for role in PBXS:
        assert after[role] == before[role], f"{backend} touched foreign rules on {role}"


def test_ban_and_unban_reach_both_pbxs(agents: Cluster) -> None:
    c = agents
    everyone = [ATTACKER4, ATTACKER6, ATTACKER4_B, ATTACKER6_B]
    assert c.all_pass(everyone), "the attacker must reach both PBXs before any ban"

    # the threshold: calls screened by pbx1's server (3 calls ban, cluster-wide)
    for ip in (ATTACKER4, ATTACKER6):
        out = c.ctl("simulate", "--ip", ip, "--calls", "3").stdout
        assert "SCREEN_RESULT=BANNED" in out, out
    assert wait_for(lambda: c.all_dropped([ATTACKER4, ATTACKER6]), 3), c.agent_logs()
    assert c.passes("pbx2", 4, ATTACKER4_B) and c.passes("pbx2", 6, ATTACKER6_B), (
        "an address nobody banned is blocked"
    )

    # an admin's ban
    for ip in (ATTACKER4_B, ATTACKER6_B):
        proc = c.ctl("ban", ip, "--for", "10m", role="pbx2")
        assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: c.all_dropped([ATTACKER4_B, ATTACKER6_B]), 3), c.agent_logs()
    assert c.passes("pbx1", 4, ATTACKER4_C) and c.passes("pbx2", 6, ATTACKER6_C)

    status = json.loads(c.ctl("status", "--json").stdout)
    agents_seen = {a["pbx_id"]: a for a in status["agents"]}
    assert set(agents_seen) == {"pbx1", "pbx2"}
    assert all(a["backend"] == c.backend for a in agents_seen.values())
    assert {b["ip"] for b in status["banned"]["list"]} == set(everyone)

    proc = c.ctl("unban", *everyone)
    assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: c.all_pass(everyone), 4), c.agent_logs()
    for role in PBXS:
        assert kernel_bans(c.topo[role], c.backend) == []


def test_short_bans_expire_on_both_pbxs_with_redis_killed(agents: Cluster) -> None:
    c = agents
    for ip in (ATTACKER4_C, ATTACKER6_C):
        assert c.ctl("ban", ip, "--for", "1h").returncode == 0
    # both short bans in one go (one `ban` command takes ~0.5 s to start)
    client = c.redis.client()
    short = [ATTACKER4_B, ATTACKER6_B]
    ends = time.monotonic() + 3
    _write_bans(client, dict.fromkeys(short, int((time.time() + 3) * 1000)))
    assert wait_for(lambda: c.all_dropped([*short, ATTACKER4_C, ATTACKER6_C]), 2.5), c.agent_logs()
    c.redis.kill()
    # the short bans end on time on both PBXs, Redis or not
    lifted = time_until(lambda: c.all_pass([ATTACKER4_B, ATTACKER6_B], 0.3), 10)
    assert lifted is not None, c.agent_logs()
    late = lifted - ends
    print(f"{c.backend}: short bans lifted {late:+.2f}s after their end, Redis dead")
    assert late < 2.5, f"bans lifted {late:.1f}s late"
    # the long ones stay: the agents neither died nor failed open
    assert c.all_dropped([ATTACKER4_C, ATTACKER6_C])
    assert all(proc.poll() is None for proc in c.agents.values())


def test_tampered_firewall_is_restored_within_sync_interval(agents: Cluster) -> None:
    c = agents
    banned = [ATTACKER4_B, ATTACKER6_B]
    for ip in banned:
        assert c.ctl("ban", ip, "--for", "10m").returncode == 0
    assert wait_for(lambda: c.all_dropped(banned), 3), c.agent_logs()
    for role, script in zip(PBXS, TAMPER[c.backend], strict=True):
        c.topo[role].run(script)
    tampered = time.monotonic()
    restored = time_until(lambda: c.all_dropped(banned), SYNC + 3)
    assert restored is not None, c.agent_logs()
    restored_in = restored - tampered
    print(f"{c.backend}: restored in {restored_in:.2f}s (sync_interval {SYNC}s)")
    assert restored_in <= SYNC + 1.5
    for role in PBXS:
        assert sorted(kernel_bans(c.topo[role], c.backend)) == sorted(banned)
    assert c.passes("pbx1", 4, ATTACKER4_C) and c.passes("pbx2", 6, ATTACKER6_C)


def _bulk_bans(count: int) -> dict[str, int]:
    """count addresses (a tenth IPv6) that no test packet uses, banned for an hour."""
    until_ms = int((time.time() + 3600) * 1000)
    out = {}
    for i in range(count):
        if i % 10 == 9:
            out[str(ipaddress.IPv6Address("2001:db8:ff::") + i)] = until_ms
        else:
            out[str(ipaddress.IPv4Address("198.18.0.0") + i)] = until_ms
    return out


def _write_bans(client, bans: dict[str, int]) -> None:
    """What the ban script writes, in bulk: the list, the records and the events."""
    pipe = client.pipeline(transaction=False)
    for n, (ip, until_ms) in enumerate(bans.items(), 1):
        pipe.zadd(KEYS.banned, {ip: until_ms})
        pipe.hset(
            KEYS.record(ip),
            mapping={"until": until_ms, "reason": "bulk", "pbx_id": "test", "bans": 1},
        )
        pipe.xadd(
            KEYS.events,
            {"op": "ban", "ip": ip, "until": until_ms, "pbx_id": "test", "reason": "bulk"},
            maxlen=20_000,
            approximate=True,
        )
        if n % 2000 == 0:
            pipe.execute()
    pipe.execute()


def test_agent_killed_while_applying_thousands_of_bans(agents: Cluster) -> None:
    c = agents
    count = BULK[c.backend]
    bans = _bulk_bans(count)
    items = list(bans.items())
    client = c.redis.client()
    first = dict(items[: count * 6 // 10])
    _write_bans(client, first)
    c.kill_agent("pbx1")  # SIGKILL while the events are being applied
    at_kill = kernel_bans(c.topo.pbx1, c.backend)
    print(f"{c.backend}: {len(at_kill)} of the first {len(first)} bans applied at SIGKILL")
    _write_bans(client, dict(items[count * 6 // 10 :]))
    restarted = time.time()
    c.start_agent("pbx1")
    c.wait_agents(restarted, roles=("pbx1",))
    wanted = sorted(
        str(ipaddress.ip_address(ip.decode()))
        for ip in client.zrangebyscore(KEYS.banned, "-inf", "+inf")
    )
    assert len(wanted) == count
    for role in PBXS:
        assert wait_for(
            lambda r=role: sorted(kernel_bans(c.topo[r], c.backend)) == wanted, 30, 0.5
        ), f"{role}: firewall != ban list\n{c.agent_logs()}"
        found = kernel_bans(c.topo[role], c.backend)
        assert len(found) == len(set(found)) == count, f"{role}: duplicates"
    assert c.all_pass([ATTACKER4, ATTACKER6]), "bulk bans blocked an unrelated address"


def test_check_in_a_pbx_reports_what_works(agents: Cluster) -> None:
    c = agents
    proc = c.ctl("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert f"firewall {c.backend}" in proc.stdout
    assert "store: redis://192.0.2.1" in proc.stdout
    if c.backend == "iptables":
        assert "nf_tables" in proc.stdout and "iptables-legacy -L FASTAGI" in proc.stdout
