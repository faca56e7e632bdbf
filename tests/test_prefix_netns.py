"""Issue 12 with real packets in network namespaces, for every kernel backend:

- default ports: a banned attacker's SIP (UDP and TCP 5060) is dropped, its other
  traffic passes; `ports = "all"` drops everything;
- IPv6 rotation: calls from many addresses of one /64 ban that /64, and the agent's
  firewall drops the whole /64 while another /64 passes;
- names we do not own: an `inet filter` table, a fail2ban `f2b-asterisk` chain, a set of
  our name made by someone else are refused with one line, and stay byte-identical;
  our own objects left by an older version are recreated.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from fastagi.emulator import Call
from fastagi.firewall import FirewallSettings
from fastagi.keys import Keys
from tests.fw_driver import DriverError, FirewallDriver
from tests.harness import running_server
from tests.netns import (  # noqa: F401
    ROTATING6,
    ROTATING6_HOSTS,
    NamespaceRedis,
    Topology,
    netns_available,
    netns_topology,
    snapshot,
)

pytestmark = [pytest.mark.netns]

KERNEL_BACKENDS = ["iptables", "nftables", "ipset"]
ATTACKER4, ATTACKER4_B, ATTACKER4_C = "192.0.2.10", "192.0.2.11", "192.0.2.12"
ATTACKER6 = "2001:db8::10"
ROTATING64 = ROTATING6
SIP_UDP, SIP_TCP, OTHER_UDP, OTHER_TCP = 5060, 5060, 5070, 2222
KEYS = Keys()
PROBE = 0.3  # seconds a probe waits: an answer inside the namespaces takes well under 10 ms
SAMPLE = [ROTATING6_HOSTS[i] for i in (0, 3, 6, 7)]  # of the /64: callers and silent ones


@pytest.fixture(scope="module")
def topo(netns_topology: Topology) -> Iterator[Topology]:  # noqa: F811
    pbx = netns_topology.pbx1
    # a host firewall of its own (iptables-nft tables exist before any backend runs)
    pbx.run(
        "iptables -A INPUT -p tcp --dport 22 -j ACCEPT; "
        "ip6tables -A INPUT -p tcp --dport 22 -j ACCEPT"
    )
    for port in (SIP_UDP, OTHER_UDP):
        pbx.udp_echo(port)
    for port in (SIP_TCP, OTHER_TCP):
        pbx.tcp_listen(port)
    assert netns_topology.can_reach("attacker", "pbx1", SIP_UDP, 6, source=ROTATING6_HOSTS[0])
    assert netns_topology.can_connect("attacker", "pbx1", SIP_TCP, 4)
    yield netns_topology


@pytest.fixture
def pbx_clean(topo: Topology) -> Iterator[Topology]:
    """pbx1's firewall as it was before the test, whatever the test left."""
    before = snapshot(topo.pbx1)
    yield topo
    for backend in KERNEL_BACKENDS:
        with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
            fw.teardown()
    assert snapshot(topo.pbx1) == before


def traffic(topo: Topology, source: str) -> dict[str, bool]:
    """Which of SIP UDP, SIP TCP, other UDP, other TCP pass from `source` to pbx1."""
    family = 6 if ":" in source else 4
    udp = lambda port: topo.can_reach("attacker", "pbx1", port, family, source, PROBE)  # noqa: E731
    tcp = lambda port: topo.can_connect("attacker", "pbx1", port, family, source, PROBE)  # noqa: E731
    return {
        "sip/udp": udp(SIP_UDP),
        "sip/tcp": tcp(SIP_TCP),
        "other/udp": udp(OTHER_UDP),
        "other/tcp": tcp(OTHER_TCP),
    }


EVERYTHING = {"sip/udp": True, "sip/tcp": True, "other/udp": True, "other/tcp": True}
SIP_DROPPED = {"sip/udp": False, "sip/tcp": False, "other/udp": True, "other/tcp": True}
ALL_DROPPED = dict.fromkeys(EVERYTHING, False)


# -- Must show 3: default ports ----------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_default_ports_drop_sip_only_and_all_drops_everything(backend, pbx_clean):
    topo = pbx_clean
    until = time.time() + 300
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:  # the default
        fw.setup()
        fw.add({ATTACKER4: until, ATTACKER6: until})
        for source in (ATTACKER4, ATTACKER6):
            assert traffic(topo, source) == SIP_DROPPED, (backend, source)
        assert traffic(topo, ATTACKER4_B) == EVERYTHING  # not banned
        fw.teardown()
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend, ports="all")) as fw:
        fw.setup()
        fw.add({ATTACKER4: until, ATTACKER6: until})
        for source in (ATTACKER4, ATTACKER6):
            assert traffic(topo, source) == ALL_DROPPED, (backend, source)
        assert traffic(topo, ATTACKER4_B) == EVERYTHING
        fw.teardown()


# -- Must show 4 (the firewall side): prefixes ---------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_banned_prefix_drops_every_address_in_it_and_nothing_beside(backend, pbx_clean):
    topo = pbx_clean
    reach = lambda source: topo.can_reach(  # noqa: E731
        "attacker", "pbx1", SIP_UDP, 6 if ":" in source else 4, source, PROBE
    )
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
        fw.setup()
        until = time.time() + 300
        fw.add({ROTATING64: until, "192.0.2.10/31": until})  # .10 and .11, not .12
        assert not any(reach(ip) for ip in SAMPLE), "an address of the /64 passed"
        assert reach(ATTACKER6), "another /64 was dropped"
        assert not reach(ATTACKER4) and not reach(ATTACKER4_B)
        assert reach(ATTACKER4_C)
        assert set(fw.list()) == {ROTATING64, "192.0.2.10/31"}
        # one address inside the /64, banned for longer: the kernel must take both
        fw.add({ROTATING6_HOSTS[0]: until + 600})
        fw.delete([ROTATING64])
        assert not reach(ROTATING6_HOSTS[0]), "the longer single-address ban was lost"
        assert reach(ROTATING6_HOSTS[1]), "the lifted /64 still drops"
        fw.set({ROTATING64: until, "2001:db8:0:100::/56": until + 60})  # nested
        assert not any(reach(ip) for ip in SAMPLE)
        assert reach(ATTACKER6)
        # nested prefixes other than /64 (nftables keeps them in one interval set)
        fw.set({})
        fw.add({"2001:db8:0:100::/60": until + 600})
        fw.add({"2001:db8:0:100::/56": until})  # wider, ends sooner: both must hold
        assert not reach(ROTATING6_HOSTS[0])
        fw.delete(["2001:db8:0:100::/56"])
        assert not reach(ROTATING6_HOSTS[0]), "the /60 inside the lifted /56 was lost"
        fw.delete(["2001:db8:0:100::/60"])
        assert reach(ROTATING6_HOSTS[0])
        fw.set({})
        assert all(reach(ip) for ip in ROTATING6_HOSTS[:3])
        fw.teardown()


# -- Must show 4 end to end: emulator calls, real Redis, the agent, real packets -----------
@pytest.fixture(scope="module")
def redis(topo: Topology, tmp_path_factory) -> Iterator[NamespaceRedis]:
    server = NamespaceRedis(topo.core, str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.kill()


def _agent_env(redis: NamespaceRedis, backend: str) -> dict[str, str]:
    return {
        "FASTAGI_REDIS_URL": redis.url(4),
        "FASTAGI_FIREWALL_BACKEND": backend,
        "FASTAGI_FIREWALL_SYNC_INTERVAL": "2s",
        "FASTAGI_SCREENING_PBX_ID": "pbx1",
    }


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_calls_from_one_64_ban_the_whole_64_on_the_pbx(backend, pbx_clean, redis, tmp_path):
    topo = pbx_clean
    redis.client().flushall()
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = topo.pbx1.spawn(
            [sys.executable, "-m", "fastagi.cli", "agent"],
            env=_agent_env(redis, backend),
            stdout=out,
            stderr=out,
        )
    reach = lambda source: topo.can_reach("attacker", "pbx1", SIP_UDP, 6, source, PROBE)  # noqa: E731

    async def calls() -> list[str]:
        async with running_server(redis.unix_url, SCREENING_THRESHOLD="5") as srv:
            results = []
            for ip in ROTATING6_HOSTS[:6]:  # each address calls once
                result = await srv.call(Call(source=ip, channel_type="PJSIP"))
                results.append(result.variables["SCREEN_RESULT"])
            return results

    try:
        assert _wait(lambda: redis.client().hlen(KEYS.agents) == 1, 20), log.read_text()
        assert reach(ROTATING6_HOSTS[7])
        results = asyncio.run(calls())
        assert results == ["COUNTED"] * 4 + ["BANNED"] * 2
        assert {m.decode() for m in redis.client().zrange(KEYS.banned, 0, -1)} == {ROTATING64}
        # every address of the /64 is dropped, also those that never called
        assert _wait(lambda: not reach(ROTATING6_HOSTS[7]), 5), log.read_text()
        assert not any(reach(ip) for ip in SAMPLE)
        assert reach(ATTACKER6), "another /64 was dropped"
        # the configured default firewall.ports: SIP only, the /64's other traffic passes
        assert topo.can_reach("attacker", "pbx1", OTHER_UDP, 6, ROTATING6_HOSTS[0], PROBE)
        assert agent.poll() is None
    finally:  # the agent only: the echo listeners of the module stay
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(10)
        topo.pbx1.procs.remove(agent)
    assert "Traceback" not in log.read_text()


# -- Must show 6 (chain half): names we do not own ----------------------------------------
FOREIGN = {
    # a distribution's /etc/nftables.conf
    "nftables": (
        "filter",
        "nft add table inet filter; "
        "nft add chain inet filter input '{ type filter hook input priority 0; policy accept; }'; "
        "nft add rule inet filter input tcp dport 22 accept",
    ),
    # fail2ban's chain, legacy tables (python-iptables writes those)
    "iptables": (
        "f2b-asterisk",
        "iptables-legacy -N f2b-asterisk; "
        "iptables-legacy -A f2b-asterisk -s 198.51.100.7/32 -j REJECT; "
        "iptables-legacy -A f2b-asterisk -j RETURN; "
        "iptables-legacy -I INPUT -p udp --dport 5060 -j f2b-asterisk",
    ),
    # fail2ban's chain, through the host's iptables (the ipset backend uses it)
    "ipset": (
        "f2b-asterisk",
        "iptables -N f2b-asterisk; iptables -A f2b-asterisk -s 198.51.100.7/32 -j REJECT; "
        "iptables -A f2b-asterisk -j RETURN; "
        "iptables -I INPUT -p udp --dport 5060 -j f2b-asterisk",
    ),
}
UNDO = {
    "nftables": "nft delete table inet filter",
    "iptables": "iptables-legacy -D INPUT -p udp --dport 5060 -j f2b-asterisk; "
    "iptables-legacy -F f2b-asterisk; iptables-legacy -X f2b-asterisk",
    "ipset": "iptables -D INPUT -p udp --dport 5060 -j f2b-asterisk; "
    "iptables -F f2b-asterisk; iptables -X f2b-asterisk",
}


def _ctl(topo: Topology, env: dict[str, str], *args: str):
    return topo.pbx1.run(
        [sys.executable, "-m", "fastagi.cli", *args],
        check=False,
        timeout=60,
        env={**_clean_env(), **env},
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_name_we_do_not_own_is_refused_and_left_untouched(backend, pbx_clean, tmp_path):
    topo = pbx_clean
    name, create = FOREIGN[backend]
    topo.pbx1.run(create)
    try:
        before = snapshot(topo.pbx1)
        settings = FirewallSettings(backend=backend, chain=name)
        with FirewallDriver(topo.pbx1, settings) as fw:
            for op in ("claim", "setup", "teardown"):
                with pytest.raises(DriverError, match=r"FirewallConflict.*not created by"):
                    fw.call(op)
            failed = [r for r in fw.check() if not r["ok"]]
            assert len(failed) == 1 and "not created by fastagi-screen" in failed[0]["detail"]
            assert "\n" not in failed[0]["detail"]
            with pytest.raises(DriverError):
                fw.add({ATTACKER4: time.time() + 60})  # nothing of ours there to add to
        env = {
            "FASTAGI_FIREWALL_BACKEND": backend,
            "FASTAGI_FIREWALL_CHAIN": name,
            "FASTAGI_REDIS_URL": "redis://192.0.2.1:1/0",  # never reached: refused before
            "FASTAGI_RUNTIME_DIR": str(tmp_path),
        }
        check = _ctl(topo, env, "check")
        assert check.returncode == 1 and "not created by fastagi-screen" in check.stdout
        agent = _ctl(topo, env, "agent")
        assert agent.returncode == 2, agent.stderr
        lines = agent.stderr.strip().splitlines()
        assert len(lines) == 1 and "not created by fastagi-screen" in lines[0], agent.stderr
        assert lines[0].startswith("fastagi-ctl: ") and "Traceback" not in agent.stderr
        serve = _ctl(topo, {**env, "FASTAGI_REDIS_URL": "memory://"}, "serve")
        assert serve.returncode == 2 and "not created by fastagi-screen" in serve.stderr
        assert snapshot(topo.pbx1) == before, "a foreign object was changed"
    finally:
        topo.pbx1.run(UNDO[backend], check=False)


def test_a_set_of_our_name_made_by_someone_else_is_refused(pbx_clean):
    topo = pbx_clean
    topo.pbx1.run("ipset create fastagi-v4 hash:ip; ipset add fastagi-v4 198.51.100.7")
    try:
        before = snapshot(topo.pbx1) | {"set": topo.pbx1.run("ipset save fastagi-v4").stdout}
        with (
            FirewallDriver(topo.pbx1, FirewallSettings(backend="ipset")) as fw,
            pytest.raises(DriverError, match="set fastagi-v4 exists and was not created"),
        ):
            fw.setup()
        after = snapshot(topo.pbx1) | {"set": topo.pbx1.run("ipset save fastagi-v4").stdout}
        assert after == before
    finally:
        topo.pbx1.run("ipset destroy fastagi-v4", check=False)


# -- our own objects from an older version ---------------------------------------------
OLDER = {
    "nftables": "nft add table inet fastagi; "
    "nft add set inet fastagi ban4 '{ type ipv4_addr; flags timeout; }'; "
    "nft add set inet fastagi ban6 '{ type ipv6_addr; flags timeout; }'; "
    "nft add chain inet fastagi input "
    "'{ type filter hook input priority filter - 10; policy accept; }'; "
    "nft add rule inet fastagi input ip saddr @ban4 counter drop; "
    "nft add rule inet fastagi input ip6 saddr @ban6 counter drop; "
    "nft add element inet fastagi ban4 '{ 192.0.2.12 timeout 1h }'",
    "ipset": "ipset create fastagi-v4 hash:ip family inet timeout 0 maxelem 1048576; "
    "ipset create fastagi-v6 hash:ip family inet6 timeout 0 maxelem 1048576; "
    "ipset add fastagi-v4 192.0.2.12 timeout 3600; "
    "iptables -N FASTAGI; iptables -A FASTAGI -m set --match-set fastagi-v4 src -j DROP; "
    "iptables -I INPUT -j FASTAGI",
    "iptables": "iptables-legacy -N FASTAGI; iptables-legacy -A FASTAGI -s 192.0.2.12/32 -j DROP; "
    "iptables-legacy -I INPUT -j FASTAGI",
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_our_objects_from_an_older_version_are_taken_up(backend, pbx_clean):
    topo = pbx_clean
    topo.pbx1.run(OLDER[backend])
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
        fw.setup()  # no conflict: ours
        fw.set({ROTATING64: time.time() + 300})
        assert not topo.can_reach("attacker", "pbx1", SIP_UDP, 6, source=ROTATING6_HOSTS[3])
        assert topo.can_reach("attacker", "pbx1", SIP_UDP, 4, source=ATTACKER4_C)
        assert set(fw.list()) == {ROTATING64}
        fw.setup()
        assert all(r["ok"] for r in fw.check())
        fw.teardown()


def test_the_nft_table_carries_our_mark(pbx_clean):
    with FirewallDriver(pbx_clean.pbx1, FirewallSettings(backend="nftables")) as fw:
        fw.setup()
        listing = pbx_clean.pbx1.run("nft list table inet fastagi").stdout
        assert 'comment "fastagi-screen"' in listing and "flags interval,timeout" in listing
        fw.teardown()
