"""`fastagi-ctl agent --teardown`, what an admin runs before purging the package (README
"Install on a PBX"): our chain/table/sets and their bans go, the host's own firewall stays
byte-identical, and an object of our name that someone else made is refused (exit 2, one
line, nothing changed). Real kernels' firewalls in a network namespace."""

from __future__ import annotations

import os
import sys
import time

import pytest

from fastagi.firewall import FirewallSettings
from tests.fw_driver import FirewallDriver
from tests.netns import Namespace, netns_available, netns_topology, snapshot  # noqa: F401

pytestmark = [pytest.mark.netns]

# the host's own rules, in the tables each backend writes to
HOST_RULES = {
    "nftables": "nft add table inet filter; "
    "nft add chain inet filter input '{ type filter hook input priority 0; policy accept; }'; "
    "nft add rule inet filter input tcp dport 22 accept",
    "iptables": "iptables-legacy -A INPUT -p tcp --dport 22 -j ACCEPT",
    # both families: iptables-nft makes its tables on first use, and leaves them
    "ipset": "iptables -A INPUT -p tcp --dport 22 -j ACCEPT; "
    "ip6tables -A INPUT -p tcp --dport 22 -j ACCEPT",
}
UNDO = {
    "nftables": "nft delete table inet filter",
    "iptables": "iptables-legacy -D INPUT -p tcp --dport 22 -j ACCEPT",
    "ipset": "iptables -D INPUT -p tcp --dport 22 -j ACCEPT; "
    "ip6tables -D INPUT -p tcp --dport 22 -j ACCEPT",
}


def teardown(ns: Namespace, backend: str, tmp_path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}
    env.update({"FASTAGI_FIREWALL_BACKEND": backend, "FASTAGI_RUNTIME_DIR": str(tmp_path)})
    proc = ns.run(
        [sys.executable, "-m", "fastagi.cli", "agent", "--teardown"],
        check=False,
        timeout=60,
        env=env,
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("backend", ["nftables", "iptables", "ipset"])
def test_teardown_removes_our_objects_and_bans_and_keeps_the_hosts_rules(
    backend,
    netns_topology,  # noqa: F811
    tmp_path,
):
    ns = netns_topology.pbx1
    ns.run(HOST_RULES[backend])
    try:
        host_only = snapshot(ns)
        with FirewallDriver(ns, FirewallSettings(backend=backend)) as fw:
            fw.setup()
            fw.add({"198.51.100.7": time.time() + 3600, "2001:db8:9::7": time.time() + 3600})
        assert snapshot(ns) != host_only  # what a stopped agent leaves behind
        code, stderr = teardown(ns, backend, tmp_path)
        assert code == 0 and "Traceback" not in stderr, stderr
        assert snapshot(ns) == host_only
        assert teardown(ns, backend, tmp_path)[0] == 0  # nothing left: still done
    finally:
        ns.run(UNDO[backend], check=False)


def test_teardown_refuses_a_table_of_our_name_made_by_someone_else(
    netns_topology,  # noqa: F811
    tmp_path,
):
    ns = netns_topology.pbx1
    ns.run(
        "nft add table inet fastagi; "
        "nft add chain inet fastagi input '{ type filter hook input priority 0; }'; "
        "nft add rule inet fastagi input tcp dport 22 accept"
    )
    try:
        before = snapshot(ns)
        code, stderr = teardown(ns, "nftables", tmp_path)
        errors = [line for line in stderr.splitlines() if line.startswith("fastagi-ctl: ")]
        assert code == 2 and len(errors) == 1 and "not created by fastagi-screen" in errors[0]
        assert "Traceback" not in stderr
        assert snapshot(ns) == before
    finally:
        ns.run("nft delete table inet fastagi", check=False)
