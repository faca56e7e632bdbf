"""The measuring parts of lab/asterisk/cluster.py (the cluster lab needs a real Asterisk
and is not run here): how the spread guesser spreads its attempts, how the timings
read, and the poll that times a drop on a PBX's real nftables sets."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from fastagi.firewall import FirewallSettings
from fastagi.firewall.nftables import NftablesFirewall
from tests.netns import in_netns, topology

CLUSTER = Path(__file__).resolve().parents[1] / "lab" / "asterisk" / "cluster.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lab_cluster", CLUSTER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while loading
    spec.loader.exec_module(module)
    return module


cluster = load()


@pytest.mark.parametrize("pbxs", [2, 3, 4])
def test_the_spread_guesser_stays_below_the_threshold_on_every_pbx(pbxs: int) -> None:
    roles = [f"pbx{n}" for n in range(1, pbxs + 1)]
    lasts = set()
    for start in range(pbxs):
        plan = cluster.spread_plan(roles, cluster.THRESHOLD, start)
        assert len(plan) == cluster.THRESHOLD
        assert max(plan.count(role) for role in roles) <= cluster.THRESHOLD - 1
        assert set(plan) == set(roles)  # every PBX sees some of it
        lasts.add(plan[-1])
    assert lasts == set(roles)  # over the rounds, each PBX takes the attempt that bans


def test_timings_read_in_milliseconds() -> None:
    assert cluster.spread_of([0.025, 0.006, 0.020]) == "min 6 / median 20 / max 25 ms"
    assert cluster.spread_of([]) == "no samples"
    assert cluster.ms(None) == "never"
    assert cluster.ms(0.0424) == "42 ms"


@pytest.mark.netns
def test_a_poll_times_the_change_and_not_a_state_found_before_it(
    netns_available: None,
) -> None:
    target = "192.0.2.11"
    with topology({"pbx1": (21, ())}) as topo:
        ns = topo["pbx1"]
        firewall = NftablesFirewall(FirewallSettings(backend="nftables"))
        in_netns(ns.name, firewall.setup)
        poll = cluster.Poll(ns, target, present=True, timeout=5)
        assert poll.ready.wait(5)
        before = time.monotonic()
        in_netns(ns.name, firewall.add, {ipaddress.ip_network(target): time.time() + 60})
        seen = poll.result()
        assert seen is not None and seen >= before
        # already there when the poll starts: no timing at all, rather than a wrong one
        assert cluster.Poll(ns, target, present=True, timeout=1).result() is None
        lifted = cluster.Poll(ns, target, present=False, timeout=5)
        assert lifted.ready.wait(5)
        in_netns(ns.name, firewall.delete, [ipaddress.ip_network(target)])
        assert lifted.result() is not None
