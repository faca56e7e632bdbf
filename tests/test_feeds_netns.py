"""Blocklists in, for real (issue 18, must show 2): feeds served by a local HTTP server,
refreshed by `serve` on pbx1, land in the shared Redis and in both PBXs' nftables, and
the attacker's real datagrams follow.

    core      redis-server (192.0.2.1: a Redis node, so protected on the PBXs)
    pbx1      `fastagi-ctl serve --no-agent` with four [[intel.feed]] entries, the feeds'
              HTTP server on its loopback, an nftables agent
    pbx2      an nftables agent
    attacker  192.0.2.10-12: listed by the feeds, sends real datagrams

APIBan-shaped JSON with paging lists 192.0.2.10; a VoIPBL-style text list (comments,
junk, a /24, the Redis node) lists 192.0.2.11; a feed lists 192.0.2.12 and then drops
it; a feed starts failing after its first answer. The dropped address and the failing
feed's entries are released one refresh after their last listing, not before.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.feed_server import FeedServer
from tests.netns import NamespaceRedis, Topology
from tests.test_cluster_netns import (
    ATTACKER4,
    ATTACKER4_B,
    ATTACKER4_C,
    KEYS,
    PBXS,
    Cluster,
    kernel_bans,
    wait_for,
)

pytestmark = [pytest.mark.netns]

REFRESH, TIMEOUT = 3, 1  # seconds: entries are held for 4 s past their last listing
APIBAN_PATH = "/api/KEY/banned"


@pytest.fixture(scope="module")
def cluster(netns_topology: Topology, tmp_path_factory) -> Iterator[Cluster]:
    topo = netns_topology
    work = tmp_path_factory.mktemp("feeds")
    redis = NamespaceRedis(topo.core, str(work))
    redis.start()
    for role in PBXS:
        topo[role].udp_echo(5060)
    try:
        yield Cluster(topo, redis, work)
    finally:
        redis.kill()


def net4(ns) -> list[str]:
    """The prefixes in our nftables interval set for IPv4."""
    proc = ns.run(["nft", "-j", "list", "set", "inet", "fastagi", "net4"], check=False)
    found = []
    for item in json.loads(proc.stdout or "{}").get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            value = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
            if isinstance(value, dict) and "prefix" in value:
                value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
            found.append(value)
    return found


def test_feeds_reach_the_shared_list_and_both_firewalls(cluster: Cluster) -> None:
    c = cluster
    feeds = FeedServer(c.topo.pbx1.socket(socket.AF_INET, socket.SOCK_STREAM))
    feeds.apiban(APIBAN_PATH, [[ATTACKER4, "198.51.100.40"], ["198.51.100.41"]])
    feeds.text(
        "/voipbl.txt",
        ["# VoIPBL", "", "203.0.113.0/24", "not an address", "192.0.2.1", ATTACKER4_B],
    )
    feeds.text("/drops.txt", ["198.51.100.50", ATTACKER4_C])
    feeds.text("/fails.txt", ["198.51.100.60"])
    timing = f'refresh = "{REFRESH}s", timeout = "{TIMEOUT}s"'
    entries = [
        f'{{ name = "apiban", url = "{feeds.url(APIBAN_PATH)}", format = "apiban", {timing} }}',
        f'{{ name = "voipbl", url = "{feeds.url("/voipbl.txt")}", format = "plain", {timing} }}',
        f'{{ name = "drops", url = "{feeds.url("/drops.txt")}", {timing} }}',
        f'{{ name = "fails", url = "{feeds.url("/fails.txt")}", {timing} }}',
    ]
    listed = {ATTACKER4, "198.51.100.40", "198.51.100.41", "203.0.113.0/24", ATTACKER4_B}
    listed |= {"198.51.100.50", ATTACKER4_C, "198.51.100.60"}
    log_path = c.logs / "serve-feeds.log"
    with c.agents_running("nftables"):
        with open(log_path, "w") as log:
            serve = c.topo.pbx1.spawn(
                [sys.executable, "-m", "fastagi.cli", "serve", "--no-agent"],
                env=c.env("pbx1", FASTAGI_INTEL_FEED=f"[{', '.join(entries)}]"),
                stdout=log,
                stderr=log,
            )
        try:

            def banned() -> set[bytes]:
                now_ms = int(time.time() * 1000)
                return set(c.redis.client().zrangebyscore(KEYS.banned, f"({now_ms}", "+inf"))

            assert wait_for(lambda: {a.encode() for a in listed} <= banned(), 15), (
                log_path.read_text()
            )
            shared = {b.decode() for b in banned()}
            # both PBXs drop every listed attacker address, real datagrams
            assert wait_for(lambda: c.all_dropped([ATTACKER4, ATTACKER4_B, ATTACKER4_C]), 5)
            kernel = {role: set(kernel_bans(c.topo[role], "nftables")) for role in PBXS}
            prefixes = {role: net4(c.topo[role]) for role in PBXS}
            status = json.loads(c.ctl("status", "--json").stdout)
            # then the feed drops .12, and the other one fails from now on
            feeds.text("/drops.txt", ["198.51.100.50"])
            feeds.pages["/fails.txt"] = (500, b"down for maintenance\n")
            changed = time.monotonic()
            assert wait_for(lambda: b"198.51.100.60" not in banned(), 2 * (REFRESH + TIMEOUT) + 4)
            failing_gone = time.monotonic() - changed
            released = wait_for(lambda: c.passes("pbx1", 4, ATTACKER4_C), 4)
            released = released and wait_for(lambda: c.passes("pbx2", 4, ATTACKER4_C), 4)
            still = c.all_dropped([ATTACKER4, ATTACKER4_B])
            after = {b.decode() for b in banned()}
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
            feeds.close()
    text = log_path.read_text()
    assert shared == listed  # the Redis node (192.0.2.1) is protected: refused
    for role in PBXS:
        assert {ATTACKER4, ATTACKER4_B, ATTACKER4_C, "198.51.100.40"} <= kernel[role]
        assert "203.0.113.0/24" in prefixes[role]
        assert "192.0.2.1" not in kernel[role]
    holds = {ban["ip"]: ban["reason"] for ban in status["banned"]["list"]}
    assert holds[ATTACKER4] == "feed:apiban" and holds["203.0.113.0/24"] == "feed:voipbl"
    assert set(status["feeds"]) == {"apiban", "voipbl", "drops", "fails"}
    assert status["feeds"]["voipbl"]["skipped"] == {
        "blank": 1,
        "comment": 1,
        "junk": 1,
        "protected": 1,
    }
    # the failing feed's list stayed held for one refresh after its last good answer
    assert failing_gone > 1.0, f"released after {failing_gone:.1f}s: not kept"
    assert released, "the address the feed dropped is still blocked"
    assert still, "addresses still listed were released"
    assert ATTACKER4_C not in after and "198.51.100.60" not in after
    summaries = re.findall(r"feed voipbl: 2 entries held until .*", text)
    assert summaries and "1 protected" in summaries[0] and "1 junk" in summaries[0]
    warnings = re.findall(r"feed fails \(.*", text)
    assert len(warnings) == 1 and "HTTP 500" in warnings[0], warnings
    assert "KEY" not in "".join(re.findall(r"feed apiban.*", text))
    assert "Traceback" not in text
