"""Must show 2: password guessing spread over three PBXs is banned on all three.

    core      redis-server (the shared store)
    pbx1-3    each: the AMI emulator on 127.0.0.1:5038 (its Asterisk), `fastagi-ctl serve`
              with `[auth] enabled` and its agent (nftables), a UDP echo on 5060
    attacker  192.0.2.10 and 2001:db8::10: guesses passwords, 2 per PBX per family

With `[auth] threshold = 6` no PBX alone sees enough (2 failures each, what a per-host
fail2ban would never ban); the failures of all three reach the threshold together, and
the attacker's packets are dropped on every PBX's firewall.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastagi.firewall import FirewallSettings
from tests.fw_driver import FirewallDriver
from tests.netns import (  # noqa: F401
    NamespaceRedis,
    Topology,
    netns_available,
    snapshot,
    topology,
    without_ours,
)
from tests.test_cluster_netns import wait_for

pytestmark = [pytest.mark.netns]

PBXS = ("pbx1", "pbx2", "pbx3")
HOSTS = {"attacker": (10, ()), "pbx1": (21, ()), "pbx2": (22, ()), "pbx3": (23, ())}
ATTACKER4, ATTACKER6 = "192.0.2.10", "2001:db8::10"
AMI_PORT, AGI_PORT = 5038, 4573


@pytest.fixture
def three_pbxs(
    netns_available: None,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[Topology, NamespaceRedis]]:
    with topology(HOSTS) as topo:
        redis = NamespaceRedis(topo.core, str(tmp_path))
        redis.start()
        for role in PBXS:
            topo[role].udp_echo(5060)
        yield topo, redis
        redis.kill()


def env(role: str, redis: NamespaceRedis) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}
    out.update(
        {
            "FASTAGI_REDIS_URL": redis.url(4),
            "FASTAGI_FIREWALL_BACKEND": "nftables",
            "FASTAGI_FIREWALL_SYNC_INTERVAL": "2s",
            "FASTAGI_SCREENING_PBX_ID": role,
            "FASTAGI_SERVER_LISTEN": f"127.0.0.1:{AGI_PORT}",
            "FASTAGI_AUTH_ENABLED": "true",
            "FASTAGI_AUTH_PORT": str(AMI_PORT),
            "FASTAGI_AUTH_USERNAME": "fastagi",
            "FASTAGI_AUTH_SECRET": "s3cret",
            "FASTAGI_AUTH_THRESHOLD": "6",
        }
    )
    return out


def start_pbx(topo: Topology, redis: NamespaceRedis, role: str, logs: Path) -> None:
    """Its Asterisk (the emulated AMI, two failures per attacker address waiting for the
    first login) and its fastagi-screen (serve with the watcher and the agent)."""
    ns = topo[role]
    emulator = [sys.executable, "-m", "fastagi.ami_emulator", "--listen", f"127.0.0.1:{AMI_PORT}"]
    for address in (ATTACKER4, ATTACKER4, ATTACKER6, ATTACKER6):
        emulator += ["--failure-from", address]
    ns.spawn(emulator, env=env(role, redis))
    ns.wait_tcp("127.0.0.1", AMI_PORT)
    log = open(logs / f"serve-{role}.log", "w")  # noqa: SIM115
    ns.spawn(
        [sys.executable, "-m", "fastagi.cli", "serve"], env=env(role, redis), stdout=log, stderr=log
    )
    log.close()
    ns.wait_tcp("127.0.0.1", AGI_PORT, timeout=20)


def auth_failures(topo: Topology, redis: NamespaceRedis) -> int:
    proc = topo.pbx1.run(
        [sys.executable, "-m", "fastagi.cli", "status", "--json"], env=env("pbx1", redis)
    )
    return json.loads(proc.stdout)["auth"]["failures"]


def test_spread_guessing_is_banned_on_every_pbx(three_pbxs, tmp_path: Path) -> None:
    topo, redis = three_pbxs
    before = {role: without_ours(snapshot(topo[role])) for role in PBXS}

    def reaches(role: str, family: int) -> bool:
        return topo.can_reach("attacker", role, 5060, family, timeout=0.6)

    try:
        for role in PBXS:
            assert reaches(role, 4) and reaches(role, 6), f"topology broken: {role}"
        # two PBXs: 4 failures per address cluster-wide, below 6: nobody is banned
        for role in PBXS[:2]:
            start_pbx(topo, redis, role, tmp_path)
        assert wait_for(lambda: auth_failures(topo, redis) == 8, 10), auth_failures(topo, redis)
        assert all(reaches(role, 4) and reaches(role, 6) for role in PBXS)
        # the third PBX's two failures per address reach the threshold together
        started = time.monotonic()
        start_pbx(topo, redis, "pbx3", tmp_path)
        assert wait_for(lambda: not any(reaches(r, f) for r in PBXS for f in (4, 6)), 10), [
            (tmp_path / f"serve-{r}.log").read_text()[-2000:] for r in PBXS
        ]
        took = time.monotonic() - started
        print(f"third PBX started -> attacker dropped on all three PBXs: {took:.2f}s")
        status = json.loads(
            topo.pbx1.run(
                [sys.executable, "-m", "fastagi.cli", "status", "--json"], env=env("pbx1", redis)
            ).stdout
        )
        bans = {b["ip"]: b for b in status["banned"]["list"]}
        assert set(bans) == {ATTACKER4, ATTACKER6}
        assert {b["reason"] for b in bans.values()} == {"auth"}
        assert {b["pbx_id"] for b in bans.values()} == {"pbx3"}
        assert status["auth"]["failures"] == 12
        assert {a["pbx_id"] for a in status["agents"]} == set(PBXS)
    finally:
        for role in PBXS:
            topo[role].stop_processes()
        after = {role: without_ours(snapshot(topo[role])) for role in PBXS}
        for role in PBXS:
            with FirewallDriver(topo[role], FirewallSettings(backend="nftables")) as fw:
                fw.teardown()
    assert after == before, "the firewall outside our table changed"
