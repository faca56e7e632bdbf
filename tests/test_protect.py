"""The protected set: never counted, never banned, never applied.

A spoofed caller (CHANNEL(recvip) is whatever source the datagram carried) or a hand-
written ban-list entry must not turn the product against its own infrastructure: this
host, its gateways and resolvers, its Redis nodes, a `protect` host name's address and
the special ranges. The host's view is read from files in the kernel's own formats
(written here to a temporary directory) and a host name resolver the test controls;
`test_host_addresses_are_what_ip_addr_shows` checks the rtnetlink reader against the
real `ip` command, and tests/test_protect_netns.py runs it all for real in namespaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import fakeredis.aioredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from fastagi import metrics as service_metrics
from fastagi.addresses import AddressSet
from fastagi.admin import render_protected
from fastagi.agent import Agent
from fastagi.emulator import Call
from fastagi.firewall.dryrun import DryRunFirewall
from fastagi.keys import Keys
from fastagi.protect import SPECIAL, Protected, ProtectedError, Sources, host_addresses
from fastagi.store import Policy, Store, redis_client
from tests.harness import firewall_ips, running_server, wait_until
from tests.harness import settings as config_of
from tests.procs import ctl
from tests.test_cluster_netns import _write_bans

# /proc/net/route and /proc/net/ipv6_route as the kernel writes them (from a real host)
ROUTE4 = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\tFE0200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
)
ROUTE6 = (
    "20010db8000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "20010db8000000000000000000000254 00000400 00000002 00000000 00000003     eth0\n"
)
RESOLV = "# comment\nsearch example.net\nnameserver 192.0.2.53\nnameserver fe80::53%eth0\n"
HOST = {"192.0.2.21": "eth0", "2001:db8::21": "eth0", "192.0.2.255": "eth0"}
NAMES = {"redis.test": ["192.0.2.1", "2001:db8::1"], "trunk.test": ["198.51.100.60"]}
# every kind of protected source, as a caller's CHANNEL(recvip) would carry it
PROTECTED_CALLERS = {
    "192.0.2.1": "Redis node",
    "2001:db8::1": "Redis node",
    "192.0.2.21": "this host's address",
    "2001:db8::21": "this host's address",
    "192.0.2.254": "gateway",
    "2001:db8::254": "gateway",
    "192.0.2.53": "resolver",
    "198.51.100.60": "trunk.test",
    "198.51.100.77": "screening.protect",  # inside the listed network
    "::ffff:192.0.2.21": "this host's address",  # the IPv4-mapped spelling
}


def sources(tmp_path: Path, names: dict[str, list[str]] | None = None) -> Sources:
    """A host whose kernel files and resolver the test writes."""
    (tmp_path / "route").write_text(ROUTE4)
    (tmp_path / "ipv6_route").write_text(ROUTE6)
    (tmp_path / "resolv.conf").write_text(RESOLV)
    answers = dict(NAMES if names is None else names)

    async def resolve(name: str) -> list[str]:
        if name not in answers:
            raise OSError(f"[Errno -2] {name}: Name or service not known")
        return answers[name]

    def host() -> list:
        return [(ipaddress.ip_address(a), f"this host's address ({i})") for a, i in HOST.items()]

    found = Sources(
        host, (tmp_path / "route", tmp_path / "ipv6_route"), (tmp_path / "resolv.conf",)
    )
    found.resolve = resolve
    found.answers = answers  # type: ignore[attr-defined]  # the test changes them
    return found


def protected_set(tmp_path: Path, **overrides: str) -> Protected:
    config = config_of(
        "redis://redis.test:6379/0",
        SCREENING_PROTECT='["trunk.test", "198.51.100.64/26"]',
        **overrides,
    )
    protected = Protected.from_config(config, sources(tmp_path))
    asyncio.run(protected.refresh())
    return protected


# -- the set itself ------------------------------------------------------------------------

EMPTY = Protected(
    [], {}, sources=Sources(host=list, route_files=(Path("/nx"),) * 2, resolv_files=())
)


SPECIAL_ONLY = Protected.from_config(
    config_of("memory://", SCREENING_IGNORE="[]", SERVER_ALLOWED_CLIENTS="[]"), EMPTY.sources
)


@st.composite
def inside_special(draw) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    net, why = draw(st.sampled_from(SPECIAL))
    network = ipaddress.ip_network(net)
    offset = draw(st.integers(0, network.num_addresses - 1))
    return network.network_address + offset, why


@settings(max_examples=300, deadline=None)
@given(inside_special(), st.integers(0, 32))
def test_every_special_address_is_protected_in_every_spelling(found, wider):
    config = SPECIAL_ONLY
    address, why = found
    assert why in config.reason(address)
    assert config.reason(str(address))
    # a network around it, as a prefix ban would be
    network = ipaddress.ip_network(f"{address}/{address.max_prefixlen - wider}", strict=False)
    assert config.reason(network)
    if address.version == 4:  # ::ffff:a.b.c.d is the same host
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        assert config.reason(mapped)
        assert config.reason(ipaddress.ip_network(f"{mapped}/{128 - wider}", strict=False))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.integers(0, 255).map(lambda n: ipaddress.IPv4Address(f"203.0.113.{n}")),
        st.integers(0, 2**80 - 1).map(lambda n: ipaddress.IPv6Address("2001:db8:5::") + n),
    )
)
def test_public_addresses_are_not_protected(address):
    config = SPECIAL_ONLY
    assert config.reason(address) is None
    assert (
        config.reason(ipaddress.ip_network(f"{address}/{address.max_prefixlen - 8}", False)) is None
    )


def test_this_host_gateways_resolvers_redis_and_protect_each_with_its_source(tmp_path):
    protected = protected_set(tmp_path)
    for address, source in PROTECTED_CALLERS.items():
        assert source in (protected.reason(address) or ""), address
    assert protected.reason("192.0.2.255") == "this host's broadcast (eth0)" or protected.reason(
        "192.0.2.255"
    )
    assert protected.reason("fe80::53") is not None  # the zone index is not part of it
    for public in ("192.0.2.10", "2001:db8::10", "198.51.100.1", "203.0.113.9"):
        assert protected.reason(public) is None, public
    # a network is protected when it overlaps any protected one
    assert protected.reason("192.0.2.0/24") and protected.reason("2001:db8::/64")
    assert protected.reason("198.51.100.0/25")  # holds trunk.test and the listed /26
    assert protected.reason("203.0.113.0/24") is None
    summary = protected.summary()
    parts = {part["source"]: part for part in summary["parts"]}
    assert parts["gateways"]["entries"] == ["192.0.2.254", "2001:db8::254"]
    assert str(tmp_path / "route") in parts["gateways"]["detail"]
    assert parts["resolvers"]["entries"] == ["192.0.2.53", "fe80::53"]
    assert parts["Redis nodes (by name)"]["entries"] == ["192.0.2.1", "2001:db8::1"]
    assert parts["screening.protect (by name)"]["entries"] == ["198.51.100.60"]
    assert parts["screening.protect"]["entries"] == ["198.51.100.64/26"]
    assert summary["size"] == sum(part["size"] for part in summary["parts"])


def test_a_name_that_stops_resolving_keeps_its_last_addresses_and_logs_once(tmp_path, caplog):
    protected = protected_set(tmp_path)
    answers = protected.sources.answers  # type: ignore[attr-defined]
    generation = protected.generation
    del answers["trunk.test"]
    with caplog.at_level(logging.WARNING, logger="fastagi.protect"):
        for _ in range(3):
            asyncio.run(protected.refresh())
    assert protected.reason("198.51.100.60") is not None  # the last good answer
    failures = [r for r in caplog.records if "cannot resolve trunk.test" in r.getMessage()]
    assert len(failures) == 1, caplog.text
    assert protected.generation == generation  # nothing changed
    answers["trunk.test"] = ["198.51.100.61"]  # the office moved
    asyncio.run(protected.refresh())
    assert protected.reason("198.51.100.61") is not None
    assert protected.reason("198.51.100.60") is None
    assert protected.generation == generation + 1


def test_refresh_runs_in_the_background_and_never_blocks_the_loop(tmp_path):
    protected = protected_set(tmp_path, SCREENING_PROTECT_REFRESH="50ms")
    answers = protected.sources.answers  # type: ignore[attr-defined]

    async def main() -> bool:
        await protected.start()
        answers["trunk.test"] = ["198.51.100.62"]
        moved = await wait_until(lambda: protected.reason("198.51.100.62") is not None)
        await protected.stop()
        return moved

    assert asyncio.run(main())


def test_host_addresses_are_what_ip_addr_shows():
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    shown = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True).stdout)
    expected = set()
    for link in shown:
        for info in link.get("addr_info", []):
            expected.add(ipaddress.ip_address(info["local"]))
            if "broadcast" in info:
                expected.add(ipaddress.ip_address(info["broadcast"]))
    assert {address for address, _ in host_addresses()} == expected


def test_the_real_host_protects_its_own_addresses_gateways_and_resolvers():
    protected = Protected.from_config(config_of("memory://"))
    for address, why in host_addresses():
        assert protected.reason(address), (address, why)
    for part in protected.summary()["parts"]:
        for entry in part["entries"]:
            assert protected.reason(entry), (part["source"], entry)


# -- screening: Must show 1 ----------------------------------------------------------------


def test_calls_from_protected_sources_are_never_counted_never_banned_logged_once(tmp_path, caplog):
    protected = protected_set(tmp_path)

    async def main():
        async with running_server(protected=protected, SCREENING_THRESHOLD="2") as srv:
            results = {}
            for source in PROTECTED_CALLERS:
                kind = "PJSIP" if ":" in source else "SIP"
                results[source] = [
                    (await srv.call(Call(source=source, channel_type=kind))).variables
                    for _ in range(4)
                ]
            attacker = [(await srv.call(Call(source="203.0.113.50"))).variables for _ in range(2)]
            traces = [await srv.store.count(a) for a in PROTECTED_CALLERS]
            traces += [await srv.store.record(a) for a in PROTECTED_CALLERS]
            totals = await srv.store.totals()
            return results, attacker, (traces, totals), await srv.store.banned()

    with caplog.at_level(logging.INFO, logger="fastagi.screening"):
        results, attacker, counted, banned = asyncio.run(main())
    for source, variables in results.items():
        ignored = {"SCREEN_RESULT": "IGNORED", "SCREEN_COUNTED": "no", "SCREEN_REASON": "protected"}
        assert variables == [ignored] * 4
        address = (
            str(ipaddress.ip_address(source).ipv4_mapped or source) if ":" in source else source
        )
        lines = [r.getMessage() for r in caplog.records if f"from {address} " in r.getMessage()]
        assert len(lines) == 1 and "not counted: protected" in lines[0], (source, lines)
        assert PROTECTED_CALLERS[source] in lines[0]
    assert [v["SCREEN_RESULT"] for v in attacker] == ["COUNTED", "BANNED"]  # the control
    traces, totals = counted
    assert set(banned) == {"203.0.113.50"}
    assert not any(traces) and totals["calls"] == 2  # no count, no record: never counted


def test_a_protected_call_is_counted_in_its_own_metric():
    from fastagi.screening import Outcome

    metrics = service_metrics.Metrics()
    metrics.session_done("screen", Outcome("IGNORED", reason="protected"), 0.01)
    metrics.session_done("screen", Outcome("IGNORED", reason="ignore"), 0.01)
    assert metrics.registry.get_sample_value("fastagi_calls_protected_total") == 1
    assert (
        metrics.registry.get_sample_value(
            "fastagi_sessions_total", {"route": "screen", "result": "IGNORED"}
        )
        == 2
    )


# -- ban: refused by the command and by the store -----------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "0.0.0.0",
        "::",
        "255.255.255.255",
        "224.0.0.1",
        "239.255.255.250",
        "ff02::1",
        "fe80::1",
        "169.254.169.254",
        "::ffff:127.0.0.2",
        "198.51.100.1",  # the Redis host of this config
        "198.51.100.70",  # in screening.protect
    ],
)
def test_ban_refuses_a_protected_address_with_one_line_and_exit_2(target, tmp_path):
    # Redis is named but nothing listens: a ban that went ahead would exit 1
    env = {
        "FASTAGI_REDIS_URL": "redis://198.51.100.1:1/0",
        "FASTAGI_SCREENING_PROTECT": '["198.51.100.64/26"]',
        "FASTAGI_SCREENING_IGNORE": "[]",
        "FASTAGI_RUNTIME_DIR": str(tmp_path),
    }
    proc = ctl("ban", target, env=env)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "protected" in proc.stderr
    assert "refusing to ban it" in proc.stderr


def test_ban_refuses_this_hosts_own_addresses(tmp_path):
    env = {"FASTAGI_REDIS_URL": "redis://127.0.0.1:1/0", "FASTAGI_RUNTIME_DIR": str(tmp_path)}
    for address, _ in host_addresses():
        proc = ctl("ban", str(address), env=env)
        assert proc.returncode == 2 and "refusing to ban it" in proc.stderr, (address, proc.stderr)


def test_the_store_never_writes_a_protected_address(tmp_path):
    protected = protected_set(tmp_path)

    async def main():
        client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
        store = Store(client, Keys(), Policy(3, 600, 3600, 2.0, 86400), "p", protected=protected)
        refused = []
        for target in ("192.0.2.1", "2001:db8::21", "198.51.100.60", "127.0.0.1"):
            with pytest.raises(ProtectedError) as caught:
                await store.ban(target, 60, "manual")
            refused.append(str(caught.value))
        await store.ban("203.0.113.9", 60, "manual")
        return refused, await store.banned(), await client.xlen(Keys().events)

    refused, banned, events = asyncio.run(main())
    assert all("protected" in text for text in refused)
    assert set(banned) == {"203.0.113.9"} and events == 1


# -- the agent ---------------------------------------------------------------------------


class CheckedDryRun(DryRunFirewall):
    """The dry-run backend with a cheap check that sees its entries, like ipset's: so
    the agent's periodic check is the count comparison alone."""

    intact_sees_entries = True

    def intact(self, expected) -> bool:
        return set(self.list()) == set(expected)


def test_agent_skips_protected_entries_once_and_its_checks_see_no_drift(
    tmp_path, redis_url, caplog
):
    protected = protected_set(tmp_path)
    store = Store(
        redis_client(config_of(redis_url).redis), Keys(), Policy(3, 600, 3600, 2.0, 86400), "pbx1"
    )
    firewall = CheckedDryRun()
    by_hand = redis.Redis.from_url(redis_url)
    end_ms = int((time.time() + 3600) * 1000)
    reads: list[str] = []

    async def main():
        metrics = service_metrics.Metrics()
        service_metrics._active = metrics  # the hooks reach it as they reach a served one
        agent = Agent(store, firewall, 0.05, AddressSet.parse([]), 50, protected=protected)
        task = asyncio.create_task(agent.run())
        original = store.banned

        async def counted_read() -> dict[str, float]:
            reads.append("read")
            return await original()

        store.banned = counted_read  # type: ignore[method-assign]
        try:
            await wait_until(lambda: agent.full_reconciles > 0)
            # another PBX, or an admin with redis-cli, wrote these: ZADD and XADD
            hand = dict.fromkeys(["192.0.2.1", "2001:db8::1", "198.51.100.60"], end_ms)
            await asyncio.to_thread(_write_bans, by_hand, {**hand, "203.0.113.5": end_ms})
            applied = await wait_until(lambda: "203.0.113.5" in firewall_ips(firewall))
            before, checks = len(reads), agent._syncs_since_full
            await wait_until(lambda: agent._syncs_since_full >= checks + 5, 5)
            periodic, reads_in_checks = agent._syncs_since_full - checks, len(reads) - before
            # a full reconcile (restart, gap) meets them again: not applied, not logged again
            agent._full_due = True
            await wait_until(lambda: agent.full_reconciles > 1)
            # the protected entry lifted by unban is forgotten; a new ban beside it applies
            await store.unban(["192.0.2.1"])
            await store.ban("203.0.113.6", 600, "manual")
            second = await wait_until(lambda: "203.0.113.6" in firewall_ips(firewall))
            skipped = metrics.registry.get_sample_value(
                "fastagi_agent_entries_skipped_total", {"pbx_id": "pbx1", "reason": "protected"}
            )
            return applied, second, periodic, reads_in_checks, skipped, set(agent.skipped)
        finally:
            agent.stop()
            await asyncio.gather(task, return_exceptions=True)
            service_metrics._active = None
            await store.close()

    with caplog.at_level(logging.WARNING, logger="fastagi.agent"):
        applied, second, periodic, reads_in_checks, skipped, left = asyncio.run(main())
    by_hand.close()
    assert applied and second
    assert firewall_ips(firewall) == {"203.0.113.5", "203.0.113.6"}
    # the periodic checks compared like with like: no list read, no "drift"
    assert periodic >= 5 and reads_in_checks == 0
    lines = [r.getMessage() for r in caplog.records if "agent: skipped" in r.getMessage()]
    skipped_entry = re.compile(r"agent: skipped (?:event '\S+ op=ban ip=|ban-list entry ')([^ ']+)")
    assert sorted(skipped_entry.match(line).group(1) for line in lines) == [
        "192.0.2.1",
        "198.51.100.60",
        "2001:db8::1",
    ]
    assert skipped == 3
    assert {str(a) for a in left} == {"2001:db8::1", "198.51.100.60"}


def test_an_applied_ban_is_lifted_when_its_address_becomes_protected(tmp_path):
    protected = protected_set(tmp_path)
    answers = protected.sources.answers  # type: ignore[attr-defined]

    async def main():
        client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
        store = Store(client, Keys(), Policy(3, 600, 3600, 2.0, 86400), "pbx1")
        firewall = DryRunFirewall()
        agent = Agent(store, firewall, 30, AddressSet.parse([]), None, protected=protected)
        await store.ban("203.0.113.7", 600, "manual")
        await agent.step()
        before = firewall_ips(firewall)
        answers["trunk.test"] = ["203.0.113.7"]  # the trunk's name now points there
        await protected.refresh()
        await agent.step()
        return before, firewall_ips(firewall)

    before, after = asyncio.run(main())
    assert before == {"203.0.113.7"} and after == set()


def test_nodes_behind_sentinel_or_cluster_are_added_and_a_failed_ask_logs_once(tmp_path, caplog):
    protected = protected_set(tmp_path)
    answers: list[object] = [["10.9.8.7", "redis-b.test"], OSError("sentinel down")]
    protected.sources.answers["redis-b.test"] = ["10.9.8.8"]  # type: ignore[attr-defined]

    async def discover() -> list[str]:
        answer = answers[0] if len(answers) == 1 else answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    protected.discover = discover
    with caplog.at_level(logging.WARNING, logger="fastagi.protect"):
        for _ in range(4):
            asyncio.run(protected.refresh())
    assert "Sentinel or Cluster" in (protected.reason("10.9.8.7") or "")
    assert "Redis node redis-b.test" in (protected.reason("10.9.8.8") or "")
    failures = [r for r in caplog.records if "cannot ask Redis for its nodes" in r.getMessage()]
    assert len(failures) == 1


def test_check_fails_when_this_hosts_addresses_cannot_be_read(tmp_path):
    def unreadable() -> list:
        raise PermissionError(13, "Permission denied")

    found = sources(tmp_path)
    found.host = unreadable
    protected = Protected.from_config(config_of("memory://"), found)
    ok, lines = render_protected(protected.summary())
    assert not ok and lines[0].startswith("FAIL protected:")
    assert any("cannot read this host's addresses: [Errno 13]" in line for line in lines)
    assert render_protected(protected_set(tmp_path).summary())[0]  # a readable host is ok
