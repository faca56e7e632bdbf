"""Every firewall backend against a real kernel, with real packets, inside namespaces.

The backend runs in pbx1's namespace (tests/fw_driver.py); the attacker sends UDP
datagrams to an echo listener on pbx1. pbx1 also carries a "host firewall" of its own
(legacy and nf_tables iptables rules, an nft table, an ipset) that must come out of
every test exactly as it went in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Iterator

import pytest

from fastagi.addresses import AddressSet, parse_target, target_text
from fastagi.agent import Agent
from fastagi.firewall import BACKENDS, FirewallError, FirewallSettings, create
from fastagi.firewall.dryrun import DryRunFirewall
from fastagi.keys import Keys
from fastagi.store import Policy, Store, redis_client
from tests.fw_driver import FirewallDriver
from tests.harness import free_port, wait_until
from tests.harness import settings as harness_settings
from tests.netns import (  # noqa: F401
    Topology,
    in_netns,
    netns_available,
    netns_topology,
    snapshot,
    without_ours,
)

KERNEL_BACKENDS = ["iptables", "nftables", "ipset"]
ATTACKER4, ATTACKER4_B, ATTACKER4_C = "192.0.2.10", "192.0.2.11", "192.0.2.12"
ATTACKER6, ATTACKER6_B = "2001:db8::10", "2001:db8::11"
ATTACKER4_NET = parse_target(ATTACKER4)

HOST_FIREWALL = """
iptables-legacy -A INPUT -p tcp --dport 22 -j ACCEPT
ip6tables-legacy -A INPUT -p tcp --dport 22 -j ACCEPT
iptables -A INPUT -p tcp --dport 22 -j ACCEPT
ip6tables -A INPUT -p tcp --dport 22 -j ACCEPT
iptables -P FORWARD ACCEPT
ip6tables -P FORWARD ACCEPT
nft add table inet hostfw
nft add chain inet hostfw input '{ type filter hook input priority 0; policy accept; }'
nft add rule inet hostfw input tcp dport 22 accept
ipset create hostset hash:ip
"""


pytestmark = [pytest.mark.netns]


@pytest.fixture(scope="module")
def topo(netns_topology: Topology) -> Iterator[Topology]:  # noqa: F811
    pbx = netns_topology.pbx1
    pbx.run(HOST_FIREWALL)
    pbx.udp_echo(5060)
    pbx.udp_echo(5070)
    assert netns_topology.can_reach("attacker", "pbx1", 5060, 4), "topology broken (IPv4)"
    assert netns_topology.can_reach("attacker", "pbx1", 5060, 6), "topology broken (IPv6)"
    yield netns_topology


@pytest.fixture
def clean(topo: Topology) -> Iterator[dict[str, str]]:
    """pbx1's firewall before the test; after it, nothing of ours may be left."""
    before = snapshot(topo.pbx1)
    yield before
    after = snapshot(topo.pbx1)
    if after != before:  # leave the next test a clean namespace, then fail this one
        for backend in KERNEL_BACKENDS:
            with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
                fw.call("teardown")
    assert after == before, "the test left something behind in pbx1's firewall"


def reach(topo: Topology, family: int = 4, source: str | None = None, port: int = 5060) -> bool:
    return topo.can_reach("attacker", "pbx1", port, family, source=source)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_bans_with_real_packets(backend: str, topo: Topology, clean: dict) -> None:
    pbx = topo.pbx1
    settings = FirewallSettings(backend=backend)
    with FirewallDriver(pbx, settings) as fw:
        fw.setup()
        first = snapshot(pbx)
        fw.setup()
        assert snapshot(pbx) == first, "a second setup() changed the firewall"
        assert without_ours(first) == without_ours(clean), "setup() touched foreign rules"
        assert fw.list() == {}
        assert reach(topo, 4) and reach(topo, 6), "setup alone must not block anyone"

        until = time.time() + 300
        fw.add({ATTACKER4: until, ATTACKER6: math.inf})
        assert not reach(topo, 4), "banned IPv4 address still gets through"
        assert not reach(topo, 6), "banned IPv6 address still gets through"
        assert reach(topo, 4, source=ATTACKER4_B), "an address we did not ban is blocked"
        assert reach(topo, 6, source=ATTACKER6_B), "an IPv6 address we did not ban is blocked"
        listed = fw.list()
        assert set(listed) == {ATTACKER4, ATTACKER6}
        assert listed[ATTACKER6] == math.inf
        assert listed[ATTACKER4] == pytest.approx(until, abs=2)
        assert without_ours(snapshot(pbx)) == without_ours(clean), "bans touched foreign rules"

        fw.add({ATTACKER4: until + 600})  # a refresh, not a duplicate
        assert fw.list()[ATTACKER4] == pytest.approx(until + 600, abs=2)
        assert fw.stats()["size"] == 2

        fw.delete([ATTACKER4, ATTACKER6, "198.51.100.7"])  # one never banned: ignored
        assert fw.list() == {}
        assert reach(topo, 4) and reach(topo, 6), "unbanned address is still blocked"

        fw.add({ATTACKER4: until, ATTACKER4_B: until})
        fw.set({ATTACKER4_C: until, ATTACKER6_B: until})
        assert set(fw.list()) == {ATTACKER4_C, ATTACKER6_B}, "set() must replace exactly"
        assert reach(topo, 4), "set() left an old ban in place"
        assert not reach(topo, 4, source=ATTACKER4_C), "set() did not apply a new ban"
        assert not reach(topo, 6, source=ATTACKER6_B), "set() did not apply a new IPv6 ban"
        fw.set({})
        assert fw.list() == {}

        fw.add({ATTACKER4: until})
        fw.teardown()
        fw.teardown()  # idempotent too
        assert snapshot(pbx) == clean, "teardown() left something of ours"
        assert reach(topo, 4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_ban_lengthened_by_the_same_span_moves_its_end(
    backend: str, topo: Topology, clean: dict
) -> None:
    """A feed's refresh lengthens every hold by the same span, so the backend is given
    the same remaining time again: the ban must still end later (a kernel that lengthens
    on a re-add ignores an unchanged timeout unless the expiry is given too)."""
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
        fw.setup()
        fw.add({ATTACKER4: time.time() + 300})
        time.sleep(2)
        later = time.time() + 300
        fw.add({ATTACKER4: later})
        assert fw.list()[ATTACKER4] == pytest.approx(later, abs=1)
        fw.teardown()


def test_nftables_lengthens_by_delete_and_add_where_a_re_add_cannot(
    topo: Topology, clean: dict
) -> None:
    """A kernel before timeout updates keeps an element's expiry on a re-add; the backend
    found so at start (told so here) lengthens one ban by delete and add, and a feed's
    refresh of a hundred by rewriting its sets."""

    def lengthen() -> tuple[float, dict]:
        fw = create(FirewallSettings(backend="nftables"))
        fw.setup()
        fw._updates_timeouts = False  # what the probe finds on such a kernel
        try:
            # each time the same span from now: a newer kernel ignores an unchanged timeout
            targets = [parse_target(f"198.51.100.{n}") for n in range(100)]
            fw.add({target: time.time() + 300 for target in [*targets, ATTACKER4_NET]})
            time.sleep(2)
            fw.add({ATTACKER4_NET: time.time() + 300})
            now = time.time()
            fw.add({target: now + 300 for target in targets})
            return now, fw.list()
        finally:
            fw.teardown()

    now, listed = in_netns(topo.pbx1.name, lengthen)
    ends = {target_text(network): until for network, until in listed.items()}
    assert len(ends) == 101
    assert all(until == pytest.approx(now + 300, abs=1.2) for until in ends.values()), ends


@pytest.mark.parametrize("backend", ["nftables", "ipset"])
def test_kernel_expires_bans_by_itself(backend: str, topo: Topology, clean: dict) -> None:
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
        fw.setup()
        fw.add({ATTACKER4: time.time() + 2, ATTACKER6: time.time() + 2})
        fw.close()  # the agent is gone: the kernel alone must lift the ban
        assert not reach(topo, 4)
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and not reach(topo, 4):
            time.sleep(0.2)
        assert reach(topo, 4), "a 2 s ban was still in force after 6 s"
        assert reach(topo, 6), "a 2 s IPv6 ban was still in force"
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
        assert fw.list() == {}
        fw.teardown()


def test_iptables_expires_bans_locally(topo: Topology, clean: dict) -> None:
    with FirewallDriver(topo.pbx1, FirewallSettings(backend="iptables")) as fw:
        fw.setup()
        fw.add({ATTACKER4: time.time() + 1, ATTACKER6: time.time() + 300})
        assert not reach(topo, 4)
        assert fw.expire() == []
        time.sleep(1.1)
        assert fw.expire() == [ATTACKER4]
        assert set(fw.list()) == {ATTACKER6}
        assert reach(topo, 4)
        fw.teardown()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ports_restrict_the_ban(backend: str, topo: Topology, clean: dict) -> None:
    settings = FirewallSettings(backend=backend, ports=("5060/udp", "5061/tcp"))
    with FirewallDriver(topo.pbx1, settings) as fw:
        fw.setup()
        fw.add({ATTACKER4: time.time() + 300, ATTACKER6: time.time() + 300})
        assert not reach(topo, 4, port=5060)
        assert not reach(topo, 6, port=5060)
        assert reach(topo, 4, port=5070), "a port outside firewall.ports was blocked"
        assert reach(topo, 6, port=5070), "an IPv6 port outside firewall.ports was blocked"
        fw.teardown()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_check_reports_what_works(backend: str, topo: Topology) -> None:
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
        results = fw.check()
    assert results and all(r["ok"] for r in results), results
    if backend == "iptables":
        variant = [r for r in results if r["what"] == "iptables variant"]
        if variant and "nf_tables" in variant[0]["detail"]:
            assert "iptables-legacy -L FASTAGI" in variant[0]["detail"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_hook_follows_config(backend: str, topo: Topology, clean: dict) -> None:
    def forward_hooked() -> bool:
        snap = snapshot(topo.pbx1)
        saved = "\n".join(snap[k] for k in ("legacy4", "legacy6", "nft4", "nft6"))
        ours = topo.pbx1.run("nft list table inet fastagi", check=False).stdout
        return re.search(r"^-A FORWARD .*-j FASTAGI$", saved, re.M) is not None or (
            "hook forward" in ours
        )

    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend, forward=True)) as fw:
        fw.setup()
        assert forward_hooked()
    with FirewallDriver(topo.pbx1, FirewallSettings(backend=backend)) as fw:
        fw.setup()  # the configuration dropped forward: setup() repairs
        assert not forward_hooked()
        fw.teardown()


# -- no namespace needed ------------------------------------------------------------------
def test_create_picks_each_backend_and_rejects_unknown_names() -> None:
    assert BACKENDS == ("iptables", "nftables", "ipset", "dry-run")
    for name in BACKENDS:
        assert create(FirewallSettings(backend=name)).name == name
    with pytest.raises(FirewallError) as err:
        create(FirewallSettings(backend="pf"))
    message = str(err.value)
    assert "\n" not in message and "'pf'" in message
    assert all(name in message for name in BACKENDS)


def test_bad_ports_are_one_clear_line() -> None:
    with pytest.raises(FirewallError, match="5060/icmp"):
        create(FirewallSettings(backend="nftables", ports=("5060/icmp",)))


def test_dry_run_is_truthful(caplog: pytest.LogCaptureFixture) -> None:
    import ipaddress

    fw = DryRunFirewall(FirewallSettings())
    a, b = ipaddress.ip_network(ATTACKER4), ipaddress.ip_network(ATTACKER6)
    with caplog.at_level(logging.INFO, logger="fastagi.firewall"):
        fw.setup()
        fw.add({a: time.time() + 0.2, b: math.inf})
    assert "would ban 192.0.2.10" in caplog.text
    assert set(fw.list()) == {a, b}
    assert fw.stats().size == 2
    time.sleep(0.25)
    assert fw.expire() == [a]
    fw.set({a: time.time() + 60})
    assert set(fw.list()) == {a}
    fw.delete([a])
    assert fw.list() == {} and fw.stats().size == 0
    assert all(r.ok for r in fw.check())


def test_iptables_agent_restarted_while_redis_is_down_still_lifts_bans(
    topo: Topology, clean: dict
) -> None:
    """iptables has no kernel timeouts: an agent that starts while Redis is unreachable
    reads each ban's end back from its rule and lifts it on time."""
    settings = FirewallSettings(backend="iptables")
    with FirewallDriver(topo.pbx1, settings) as fw:  # the agent before its restart
        fw.setup()
        fw.add({ATTACKER4: time.time() + 3, ATTACKER4_B: time.time() + 600})
    assert not reach(topo, 4) and not reach(topo, 4, source=ATTACKER4_B)

    async def restarted_agent(fw: FirewallDriver) -> bool:
        unreachable = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        config = harness_settings(unreachable)
        store = Store(redis_client(config.redis), Keys(), Policy(3, 600, 3600, 2, 86400), "pbx")
        agent = Agent(store, fw, 30, AddressSet.parse([]), block_ms=20)
        task = asyncio.create_task(agent.run())
        try:  # the driver is the agent's alone while it runs: watch the agent
            held = lambda: {target_text(t) for t in agent.applied}  # noqa: E731
            adopted = await wait_until(lambda: ATTACKER4_B in held(), timeout=10)
            lifted = await wait_until(lambda: held() == {ATTACKER4_B}, timeout=10)
            return adopted and lifted
        finally:
            agent.stop()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()

    with FirewallDriver(topo.pbx1, settings) as fw:
        assert asyncio.run(restarted_agent(fw)), "the agent did not take over and expire bans"
        assert set(fw.list()) == {ATTACKER4_B}
        assert reach(topo, 4), "a ban past its end was not lifted"
        assert not reach(topo, 4, source=ATTACKER4_B), "a running ban was lifted"
        fw.teardown()
