"""Network faults between a PBX and Redis, with real namespaces (tests/netns.py):
redis-server in `core`, `fastagi-ctl serve` (nftables agent) in `pbx1`, the emulator
playing Asterisk inside `pbx1`.

- link down (`ip link set eth0 down` in pbx1): every call is still answered within
  session_timeout (SCREEN_RESULT=ERROR, fail open); a ban applied before expires in
  pbx1's kernel on time; a ban made in Redis meanwhile reaches pbx1 when the link returns;
- 50% packet loss both ways (`tc netem`): calls answered within session_timeout.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time

import pytest

from fastagi.emulator import Call, FakeAsterisk
from tests.netns import CORE4, Topology, in_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]
SESSION_TIMEOUT = 2.0
REDIS = f"redis://{CORE4}:6379/0"
AGI = "agi://127.0.0.1:4573/screen"


def _calls(topo: Topology, ips: list[str]) -> list[tuple[str, float]]:
    """Calls played from inside pbx1, one after the other: (SCREEN_RESULT, seconds)."""

    async def play():
        out = []
        emulator = FakeAsterisk(hold_limit=SESSION_TIMEOUT + 10)
        for ip in ips:
            started = time.monotonic()
            result = await emulator.call(AGI, Call(source=ip))
            out.append((result.variables.get("SCREEN_RESULT", "none"), time.monotonic() - started))
        return out

    return in_netns(topo.pbx1.name, lambda: asyncio.run(play()))


def _banned_in_pbx1(topo: Topology) -> str:
    proc = topo.pbx1.run(["nft", "list", "set", "inet", "fastagi", "ban4"], check=False)
    return proc.stdout


def _wait(predicate, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def _ctl_in_core(topo: Topology, *args: str) -> None:
    env = f"FASTAGI_REDIS_URL={REDIS} FASTAGI_SCREENING_IGNORE="
    topo.core.run(f"{env} {sys.executable} -m fastagi.cli {' '.join(args)}", timeout=30)


LOSS_NFT = f"""table inet fa_loss {{
  chain out {{ type filter hook output priority 0; ip daddr {CORE4} tcp dport 6379 \\
    numgen random mod 100 < 50 drop; }}
  chain in {{ type filter hook input priority 0; ip saddr {CORE4} tcp sport 6379 \\
    numgen random mod 100 < 50 drop; }}
}}
"""


def _add_loss(topo: Topology) -> str:
    netem = topo.pbx1.run(
        ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "loss", "50%"], check=False
    )
    if netem.returncode == 0:
        topo.core.run(["tc", "qdisc", "add", "dev", "p1", "root", "netem", "loss", "50%"])
        return "netem"
    topo.pbx1.run(["nft", "-f", "-"], input=LOSS_NFT)  # no sch_netem in this kernel
    return "nft numgen"


def _remove_loss(topo: Topology, how: str) -> None:
    if how == "netem":
        topo.pbx1.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
        topo.core.run(["tc", "qdisc", "del", "dev", "p1", "root"], check=False)
    else:
        topo.pbx1.run(["nft", "delete", "table", "inet", "fa_loss"], check=False)


@pytest.fixture
def setup(netns_topology_fn: Topology, tmp_path):
    if shutil.which("redis-server") is None or shutil.which("nft") is None:
        pytest.skip("needs redis-server and nft")
    topo = netns_topology_fn
    topo.core.spawn(
        [
            "redis-server",
            "--port",
            "6379",
            "--bind",
            CORE4,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
    )
    topo.core.wait_tcp(CORE4, 6379)
    env = {
        "FASTAGI_REDIS_URL": REDIS,
        "FASTAGI_SERVER_LISTEN": "127.0.0.1:4573",
        "FASTAGI_SERVER_SESSION_TIMEOUT": f"{SESSION_TIMEOUT}s",
        "FASTAGI_SCREENING_IGNORE": "",
        "FASTAGI_SCREENING_THRESHOLD": "3",
        "FASTAGI_SCREENING_BAN_TIME": "5s",
        "FASTAGI_SCREENING_BAN_TIME_MAX": "1m",
        "FASTAGI_SCREENING_PBX_ID": "pbx1",
        "FASTAGI_FIREWALL_BACKEND": "nftables",
        "FASTAGI_FIREWALL_SYNC_INTERVAL": "2s",
        "FASTAGI_RUNTIME_DIR": str(tmp_path / "run"),
        "PYTHONPATH": os.getcwd(),
    }
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    topo.pbx1.spawn([sys.executable, "-m", "fastagi.cli", "serve"], env=env, stdout=log, stderr=log)
    topo.pbx1.wait_tcp("127.0.0.1", 4573, timeout=15)
    yield topo
    log.close()


def test_link_down_and_packet_loss(setup):
    topo = setup
    timings: list[float] = []
    # Healthy: the third call bans, the agent puts it in pbx1's kernel set.
    healthy = _calls(topo, ["198.51.100.1"] * 3)
    assert [r for r, _ in healthy] == ["COUNTED", "COUNTED", "BANNED"]
    assert _wait(lambda: "198.51.100.1" in _banned_in_pbx1(topo), 3) is not None
    banned_at = time.monotonic()

    # Link down: answered within session_timeout, fail open.
    topo.pbx1.run(["ip", "link", "set", "eth0", "down"])
    try:
        down = _calls(topo, ["198.51.100.2"] * 4)
        timings += [s for _, s in down]
        assert [r for r, _ in down] == ["ERROR"] * 4
        assert max(s for _, s in down) < SESSION_TIMEOUT
        # Meanwhile a ban is made in Redis (from core), and the old one expires locally.
        _ctl_in_core(topo, "ban", "203.0.113.77", "--for", "1m")
        expired = _wait(lambda: "198.51.100.1" not in _banned_in_pbx1(topo), 10)
        assert expired is not None, "the ban did not expire in pbx1 while Redis was away"
        expired_after = time.monotonic() - banned_at
        assert "203.0.113.77" not in _banned_in_pbx1(topo)
    finally:
        topo.pbx1.run(["ip", "link", "set", "eth0", "up"])
    caught_up = _wait(lambda: "203.0.113.77" in _banned_in_pbx1(topo), 15)
    assert caught_up is not None, "the agent did not catch up after the link returned"
    back = _calls(topo, ["198.51.100.3"])
    assert back[0][0] == "COUNTED"

    # 50% loss both ways between pbx1 and Redis: tc netem where the kernel has it,
    # else the same loss with nftables `numgen random` drops in pbx1 (our own table).
    loss = _add_loss(topo)
    try:
        lossy = _calls(topo, [f"198.51.100.{n}" for n in range(10, 30)])
    finally:
        _remove_loss(topo, loss)
    timings += [s for _, s in lossy]
    outcomes = [r for r, _ in lossy]
    print(
        f"\nnetwork faults ({loss}): link down {len(down)} calls ERROR in max "
        f"{max(s for _, s in down):.2f}s; ban expired locally {expired_after:.1f}s after "
        f"it was applied (ban_time 5s); agent caught up {caught_up:.1f}s after link up; "
        f"50% loss: {outcomes.count('COUNTED')} COUNTED, {outcomes.count('ERROR')} ERROR, "
        f"max {max(s for _, s in lossy):.2f}s; max session under faults {max(timings):.2f}s"
    )
    assert set(outcomes) <= {"COUNTED", "ERROR"}
    assert max(timings) < SESSION_TIMEOUT
    assert expired_after < 5 + 2
