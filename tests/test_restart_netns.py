"""Restarts keep every ban, with nftables in network namespaces and real processes.

1. The embedded default: `fastagi-ctl serve` (memory://, nftables, its own agent) is
   SIGKILLed and started again. Bans, history (`status IP`) and escalation (the next
   ban is longer) are intact, and the kernel's ban sets are the same after as before
   and never lacked a ban in between (sampled all through the restart).
2. A shared Redis without persistence under two `fastagi-ctl agent`s (pbx1, pbx2):
   killed and restarted empty, or FLUSHALLed. No ban leaves either firewall at any
   moment, Redis holds the bans again (same ends) within sync_interval, and a later
   `unban` lifts them everywhere. `unban --all` is an unban, not a wipe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fastagi.keys import Keys
from fastagi.persist import STATE_FILE
from tests.netns import Namespace, NamespaceRedis, Topology, topology
from tests.test_cluster_netns import kernel_bans, wait_for

pytestmark = [pytest.mark.netns]

SYNC = 2.0  # firewall.sync_interval of the agents here
KEYS = Keys()
PBXS = ("pbx1", "pbx2")


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}
    env.update({f"FASTAGI_{k.upper()}": v for k, v in settings.items()})
    return env


def ctl(ns: Namespace, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return ns.run([sys.executable, "-m", "fastagi.cli", *args], check=False, env=env, timeout=60)


class Sampler:
    """Reads what the kernel holds on some PBXs, over and over, in a thread: any sample
    that lacks one of `expected` is a moment a ban had left a firewall."""

    def __init__(self, hosts: list[Namespace], expected: set[str]) -> None:
        self.hosts, self.expected = hosts, expected
        self.samples = 0
        self.lacking: list[tuple[str, set[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for ns in self.hosts:
                missing = self.expected - set(kernel_bans(ns, "nftables"))
                if missing:
                    self.lacking.append((ns.role, missing))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# -- 1. the embedded default, SIGKILLed ----------------------------------------------


def _serve(ns: Namespace, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        proc = ns.spawn(
            [sys.executable, "-m", "fastagi.cli", "serve"], env=env, stdout=out, stderr=out
        )
    ns.wait_tcp("127.0.0.1", 4573, timeout=20)
    return proc


def _status(ns: Namespace, env: dict[str, str]) -> dict:
    proc = ctl(ns, env, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def saved_bans(state: Path) -> set[str]:
    """The addresses on the ban list in the state file (the file the service wrote)."""
    if not state.exists():
        return set()
    for entry in json.loads(state.read_text())["keys"]:
        if entry["key"] == KEYS.banned:
            return {member for member, _ in entry["value"]}
    return set()


def _ban_until(output: str) -> float:
    for line in output.splitlines():
        for part in line.split():
            if part.startswith("SCREEN_BAN_UNTIL="):
                return float(part.split("=", 1)[1])
    raise AssertionError(f"no SCREEN_BAN_UNTIL in {output!r}")


def test_embedded_serve_sigkilled_keeps_bans_history_escalation_and_firewall(
    netns_available, tmp_path
):
    env = _env(
        redis_url="memory://",
        firewall_backend="nftables",
        firewall_sync_interval=f"{SYNC}s",
        server_state_dir=str(tmp_path / "state"),
        server_listen="127.0.0.1:4573",
        screening_threshold="3",
        screening_ban_time="1h",
        screening_ban_time_factor="2",
        screening_pbx_id="pbx1",
    )
    env["FASTAGI_RUNTIME_DIR"] = str(tmp_path / "run")
    log = tmp_path / "serve.log"
    threshold, manual, repeat = "203.0.113.1", "2001:db8:5::9", "203.0.113.3"
    with topology({"pbx1": (21, ())}) as topo:
        ns = topo.pbx1
        proc = _serve(ns, env, log)
        out = ctl(ns, env, "simulate", "--ip", threshold, "--calls", "3").stdout
        assert "SCREEN_RESULT=BANNED" in out, out
        assert ctl(ns, env, "ban", manual, "--for", "2h").returncode == 0
        # a repeat offender's history: banned once, unbanned; the next ban must be longer
        assert "BANNED" in ctl(ns, env, "simulate", "--ip", repeat, "--calls", "3").stdout
        assert ctl(ns, env, "unban", repeat).returncode == 0
        banned = {threshold, manual}
        assert wait_for(lambda: set(kernel_bans(ns, "nftables")) == banned, 5), log.read_text()
        state = tmp_path / "state" / STATE_FILE
        assert wait_for(lambda: saved_bans(state) == banned, 3)  # the unban is on disk too
        before = {b["ip"]: b["until"] for b in _status(ns, env)["banned"]["list"]}

        with Sampler([ns], banned) as sampler:
            os.killpg(proc.pid, signal.SIGKILL)  # no shutdown, no final save
            proc.wait(10)
            restarted = time.time()
            _serve(ns, env, log)

            def agent_back() -> bool:
                agents = _status(ns, env)["agents"]
                return any(a["last_heartbeat"] >= restarted for a in agents)

            assert wait_for(agent_back, 20, 0.2), log.read_text()
            time.sleep(SYNC)  # and a periodic check of the agent

        after = {b["ip"]: b["until"] for b in _status(ns, env)["banned"]["list"]}
        history = ctl(ns, env, "status", repeat).stdout
        kernel_after = set(kernel_bans(ns, "nftables"))
        again = ctl(ns, env, "simulate", "--ip", repeat, "--calls", "3").stdout
        second_until = _ban_until(again)
        escalated = second_until - time.time()
        topo.close()  # SIGTERM: the final save
    text = log.read_text()
    print(f"\nembedded restart: {sampler.samples} samples of the nft sets, none lacking a ban")
    assert sampler.samples >= 10
    assert sampler.lacking == [], sampler.lacking[:5]
    assert kernel_after == banned
    assert after == pytest.approx(before, abs=0.002)  # same bans, same ends
    assert "Previous bans:   1" in history, history
    assert "BANNED" in again
    assert escalated == pytest.approx(2 * 3600, abs=120)  # ban_time * factor^1
    assert "restored 2 running bans" in text, text


# -- 2. a shared Redis that lost its data --------------------------------------------


class Cluster:
    def __init__(self, topo: Topology, redis: NamespaceRedis, logs: Path) -> None:
        self.topo, self.redis, self.logs = topo, redis, logs

    def env(self, role: str) -> dict[str, str]:
        return _env(
            redis_url=self.redis.url(4),
            firewall_backend="nftables",
            firewall_sync_interval=f"{SYNC}s",
            screening_pbx_id=role,
        )

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return ctl(self.topo.pbx1, self.env("pbx1"), *args)

    def kernels(self) -> dict[str, set[str]]:
        return {role: set(kernel_bans(self.topo[role], "nftables")) for role in PBXS}

    def everywhere(self, addresses: set[str]) -> bool:
        return all(bans == addresses for bans in self.kernels().values())

    def banned(self) -> dict[str, float]:
        rows = self.redis.client().zrange(KEYS.banned, 0, -1, withscores=True)
        return {ip.decode(): score for ip, score in rows}

    def logs_tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-12:])
            for p in sorted(self.logs.glob("agent-*.log"))
        )


@pytest.fixture(scope="module")
def cluster(netns_available, tmp_path_factory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("wipe")
    with topology({"pbx1": (21, ()), "pbx2": (22, ())}) as topo:
        redis = NamespaceRedis(topo.core, str(work))  # --save "" --appendonly no
        redis.start()
        c = Cluster(topo, redis, work)
        for role in PBXS:
            with open(work / f"agent-{role}.log", "a") as out:
                topo[role].spawn(
                    [sys.executable, "-m", "fastagi.cli", "agent"],
                    env=c.env(role),
                    stdout=out,
                    stderr=out,
                )
        assert wait_for(lambda: len(redis.client().hgetall(KEYS.agents)) == 2, 20), c.logs_tail()
        yield c
        redis.kill()


@contextmanager
def bans_in_place(c: Cluster, addresses: set[str]) -> Iterator[dict[str, float]]:
    """Ban `addresses` (by `fastagi-ctl ban`), wait until both PBXs drop them; unban after."""
    for n, ip in enumerate(sorted(addresses)):
        proc = c.ctl("ban", ip, "--for", f"{30 + n}m")
        assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: c.everywhere(addresses), 5), c.logs_tail()
    try:
        yield c.banned()
    finally:
        c.ctl("unban", *sorted(addresses))


def _wiped_and_healed(c: Cluster, addresses: set[str], wipe: Callable[[], None]) -> None:
    with bans_in_place(c, addresses) as ends:
        with Sampler([c.topo.pbx1, c.topo.pbx2], addresses) as sampler:
            wipe()
            wiped = time.monotonic()
            healed = wait_for(lambda: addresses <= set(c.banned()), SYNC + 1, 0.02)
            healed_in = time.monotonic() - wiped
            restored = c.banned()
            time.sleep(SYNC)  # the agents' next periodic check, still sampled
        print(f"\nRedis whole again {healed_in:.2f}s after the wipe ({sampler.samples} samples)")
        assert sampler.lacking == [], sampler.lacking[:5]
        assert healed and healed_in <= SYNC, c.logs_tail()
        assert restored == pytest.approx(ends, abs=1)  # the same ends (ms), not new ones
        record = c.redis.client().hgetall(KEYS.record(sorted(addresses)[0]))
        assert record[b"reason"] == b"restored"
        # a later unban lifts them everywhere
        first, *rest = sorted(addresses)
        assert c.ctl("unban", first).returncode == 0
        assert wait_for(lambda: c.everywhere(set(rest)), 5), c.logs_tail()
        time.sleep(SYNC + 0.5)  # a periodic check later: still lifted, the rest still banned
        assert c.everywhere(set(rest)) and set(c.banned()) == set(rest)


def test_redis_restarted_empty_under_two_agents(cluster: Cluster) -> None:
    def restart_empty() -> None:
        cluster.redis.kill()
        cluster.redis.start()

    _wiped_and_healed(cluster, {"203.0.113.21", "203.0.113.22", "2001:db8:7::21"}, restart_empty)


def test_redis_flushall_under_two_agents(cluster: Cluster) -> None:
    flush = cluster.redis.client().flushall
    _wiped_and_healed(cluster, {"203.0.113.31", "203.0.113.32", "2001:db8:7::31"}, flush)


def test_unban_all_is_not_a_wipe(cluster: Cluster) -> None:
    addresses = {"203.0.113.41", "2001:db8:7::41"}
    with bans_in_place(cluster, addresses):
        proc = cluster.ctl("unban", "--all")
        assert proc.returncode == 0, proc.stderr
        assert wait_for(lambda: cluster.everywhere(set()), 5), cluster.logs_tail()
        time.sleep(2 * SYNC + 0.5)  # two periodic checks: nothing written back
        assert cluster.everywhere(set())
        assert cluster.banned() == {}
