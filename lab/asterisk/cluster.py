#!/usr/bin/env python3
"""Password guessing against three real Asterisks that share one Redis (not part of CI).

    sudo .venv/bin/python lab/asterisk/cluster.py --asterisk PREFIX/inst [--work DIR]

Three PBX namespaces, each with its own Asterisk (lab.py's private config) and its own
`fastagi-ctl serve` (the `[auth]` AMI watcher, nftables), all counting in one real
redis-server in the topology's core namespace, and an attacker namespace that reaches
every PBX. A guesser that spreads wrong-password REGISTERs over the PBXs, fewer than
the threshold on each (what a per-host fail2ban never bans), and sipvicious' svcrack
against one PBX must both be dropped on every PBX; `fastagi-ctl unban` on one PBX must
lift that everywhere. Each drop and lift is timed by reading every PBX's nftables sets
every few ms from inside its namespace, and checked on the wire. Prints a pass/fail
table and the timings; exit 0 when every check passed. Like lab.py it needs root and
touches nothing outside the namespaces it makes (all removed at the end, also on
failure, ^C or SIGTERM).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastagi.firewall import FirewallSettings
from fastagi.firewall.base import FirewallError
from fastagi.firewall.nftables import NftablesFirewall
from lab import (
    ROOT,
    THRESHOLD,
    USER,
    Asterisk,
    Dialog,
    Result,
    Stack,
    asterisk_version,
    ctl,
    invite,
    register_wrong_password,
    stacks_of,
    table,
    workdir,
    write_config,
    write_service_config,
)
from tests.netns import CORE4, Namespace, NamespaceRedis, Topology, in_netns, make_topology

PBXS = ("pbx1", "pbx2", "pbx3")
HOSTS = {"attacker": (10, (11, 12)), "pbx1": (21, ()), "pbx2": (22, ()), "pbx3": (23, ())}
SVCRACK_FROM = "192.0.2.10"  # svcrack sends from the attacker's main address
SPREAD = "192.0.2.11"  # the spread guesser
BYSTANDER = "192.0.2.12"  # still answered everywhere while the guessers are dropped
TABLE = "fastagi"  # the nftables table of the service's default firewall.chain
POLL = 0.005  # seconds between two reads of a PBX's nftables sets while timing
# Seconds a Poll waits for a drop or a lift (it ends at the change: this is only the limit).
# The unban is timed from the start of a `fastagi-ctl` process, whose Python start-up took
# up to 6 s on a loaded lab machine; svcrack runs ~20 s; in_netns gives a thread 30 s.
SETTLE = 25.0
# One libnftables call at a time in this process: its JSON output is not thread-safe
# (nftables 1.0.6 json.c set_dtype_json uses strtok; three polls at once once aborted the
# whole lab on its assertion, leaving every namespace behind). The service has one
# firewall per process, each call under that firewall's own lock.
NFT_LOCK = threading.Lock()


def spread_plan(pbxs: Iterable[str], attempts: int, start: int = 0) -> list[str]:
    """Which PBX each attempt goes to: round robin from `start`, so no PBX gets more than
    ceil(attempts / PBXs) and the one that reaches the threshold changes with `start`."""
    order = list(pbxs)
    return [order[(start + n) % len(order)] for n in range(attempts)]


def ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


def spread_of(samples: list[float]) -> str:
    """min / median / max of a list of delays, in ms."""
    if not samples:
        return "no samples"
    low, mid, high = min(samples), statistics.median(samples), max(samples)
    return f"min {low * 1000:.0f} / median {mid * 1000:.0f} / max {high * 1000:.0f} ms"


class Poll:
    """Whether a target is in one PBX's nftables sets, read from a thread inside its
    namespace (the product's own reader, libnftables: a few ms a read) until it changes:
    when the drop (or the lift) was first in force, within one read. `nft monitor` would
    cost nothing, but nft 1.0.6's monitor loses the sets from its cache once the agent
    declares them again (each sync re-runs its idempotent setup) and then prints no
    element at all."""

    def __init__(self, ns: Namespace, target: str, present: bool, timeout: float) -> None:
        self.network = ipaddress.ip_network(target)
        self.present, self.until = present, time.monotonic() + timeout
        self.ready = threading.Event()  # the old state was read once: act now
        self.seen: float | None = None
        self.thread = threading.Thread(target=in_netns, args=(ns.name, self._poll), daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        firewall = NftablesFirewall(FirewallSettings(backend="nftables"))
        try:
            while time.monotonic() < self.until:
                try:
                    with NFT_LOCK:
                        applied = firewall.list()
                except FirewallError:  # no table (yet, or any more): nothing is dropped
                    applied = {}
                if (self.network in applied) == self.present:
                    if self.ready.is_set():
                        self.seen = time.monotonic()
                    return  # (already there before the action: not a timing)
                self.ready.set()
                time.sleep(POLL)
        finally:
            self.ready.set()

    def result(self) -> float | None:
        """The monotonic time the change was first read, or None (none by the timeout)."""
        self.thread.join()
        return self.seen


def polls(pbxs: list[Pbx], target: str, present: bool, timeout: float = SETTLE) -> dict[str, Poll]:
    """A Poll on every PBX, each past its first read before this returns."""
    started = {p.role: Poll(p.ns, target, present, timeout) for p in pbxs}
    for poll in started.values():
        poll.ready.wait(timeout)
    return started


@dataclass
class Pbx:
    role: str
    ns: Namespace
    asterisk: Asterisk
    config: Path

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ctl(self.config, *args, ns=self.ns)


@dataclass
class Timings:
    """What one run measured, in seconds, per PBX."""

    drops: dict[str, list[float]] = field(default_factory=dict)  # failing attempt -> drop
    lifts: dict[str, list[float]] = field(default_factory=dict)  # first PBX lifted -> lifted

    def add(self, kind: dict[str, list[float]], role: str, delay: float | None) -> None:
        if delay is not None:
            kind.setdefault(role, []).append(delay)

    def text(self) -> str:
        lines = [
            "| PBX | spread guesser: failing attempt sent -> dropped "
            "| `unban`: first PBX lifted -> lifted here |",
            "|---|---|---|",
        ]
        for role in PBXS:
            lines.append(
                f"| {role} | {spread_of(self.drops.get(role, []))} | "
                f"{spread_of(self.lifts.get(role, []))} |"
            )
        return "\n".join(lines)


# -- the cluster ------------------------------------------------------------------------


def start_pbx(
    topo: Topology, role: str, work: Path, inst: Path, stacks: list[Stack], redis_url: str
) -> Pbx:
    """Its own Asterisk and `fastagi-ctl serve` (watcher, agent), counting in the shared
    Redis under pbx_id = role; ready once the watcher is logged in to Asterisk's AMI and
    the agent's table exists."""
    ns, home = topo[role], work / role
    home.mkdir(parents=True, exist_ok=True)
    asterisk = Asterisk(inst, write_config(home, inst, stacks), ns, home / "asterisk.out")
    config = write_service_config(home, stacks, redis_url=redis_url, pbx_id=role)
    log_path = home / "fastagi-serve.log"
    with log_path.open("ab") as log:
        ns.spawn(
            [sys.executable, "-m", "fastagi.cli", "--config", str(config), "serve"],
            stdout=log,
            stderr=log,
            cwd=str(ROOT),
        )
    deadline = time.monotonic() + 30
    while not (
        "logged in as" in log_path.read_text(errors="replace")
        and ns.run(["nft", "list", "table", "inet", TABLE], check=False).returncode == 0
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{role}: fastagi-ctl serve not ready in 30 s (see {log_path})")
        time.sleep(0.2)
    return Pbx(role, ns, asterisk, config)


def on_all(pbxs: list[Pbx], fn: Callable[[Pbx], object]) -> dict[str, object]:
    """fn on every PBX at once (each wire check may wait out a timeout)."""
    with ThreadPoolExecutor(len(pbxs)) as pool:
        return dict(zip((p.role for p in pbxs), pool.map(fn, pbxs), strict=True))


def challenge(attacker: Namespace, src: str, pbx: Pbx, port: int) -> int | None:
    """An unauthenticated REGISTER: 401 when the PBX answers `src` (a challenge is never
    counted), None when nothing came back."""
    try:
        dialog = Dialog(attacker, src, pbx.ns.ipv4, port, "udp", 3)
    except OSError:
        return None
    try:
        final = dialog.request("REGISTER", USER, 1, "Expires: 60\r\n")
    except OSError:
        return None
    finally:
        dialog.close()
    return final[0] if final else None


def protected_set(pbxs: list[Pbx]) -> Result:
    """Each PBX protects the Redis node and its own address, never an attacker's."""
    wrong = []
    for pbx in pbxs:
        status = json.loads(pbx.ctl("status", "--json").stdout or "{}")
        entries = [
            ipaddress.ip_network(e, strict=False)
            for part in (status.get("protected") or {}).get("parts", [])
            for e in part.get("entries", [])
        ]

        def covered(address: str, networks=entries) -> bool:
            return any(ipaddress.ip_address(address) in n for n in networks)

        for address in (CORE4, pbx.ns.ipv4):
            if not covered(address):
                wrong.append(f"{pbx.role} does not protect {address}")
        for address in (SVCRACK_FROM, SPREAD, BYSTANDER):
            if covered(address):
                wrong.append(f"{pbx.role} protects the attacker's {address}")
    return Result(
        "protected set: the Redis node and each PBX's own address, no attacker",
        not wrong,
        "; ".join(wrong)
        or f"{CORE4} (Redis) and {', '.join(p.ns.ipv4 for p in pbxs)} protected; "
        f"{SVCRACK_FROM}, {SPREAD}, {BYSTANDER} not",
    )


def dropped_everywhere(pbxs: list[Pbx], attacker: Namespace, src: str, port: int) -> Result:
    """The wire after a ban: on every PBX `src`'s next REGISTER (a wrong password, as the
    guesser would send) and INVITE get no answer; a bystander is still answered."""

    def probe(pbx: Pbx) -> tuple[int | None, int | None, int | None]:
        ip = pbx.ns.ipv4
        return (
            register_wrong_password(attacker, src, ip, port),
            invite(attacker, src, ip, port, "7001", "udp", timeout=2),
            challenge(attacker, BYSTANDER, pbx, port),
        )

    seen = on_all(pbxs, probe)
    ok = all(v[:2] == (None, None) and v[2] == 401 for v in seen.values())  # type: ignore[index]
    detail = ", ".join(
        f"{role}: REGISTER {v[0]}, INVITE {v[1]}, bystander {v[2]}"  # type: ignore[index]
        for role, v in seen.items()
    )
    return Result(f"{src} dropped on every PBX (wire)", ok, detail)


def delays(started: dict[str, Poll], since: float) -> dict[str, float | None]:
    """Each PBX's change, in seconds after `since` (None: not within its poll's time)."""
    out = {}
    for role, poll in started.items():
        when = poll.result()
        out[role] = None if when is None else when - since
    return out


def listed(delay: dict[str, float | None], plus: str = "") -> str:
    return ", ".join(f"{role} {plus}{ms(d)}" for role, d in delay.items())


def unban(pbxs: list[Pbx], attacker: Namespace, src: str, port: int, timings: Timings) -> Result:
    """`fastagi-ctl unban` on the first PBX: `src` leaves every PBX's set and is answered
    again everywhere."""
    watching = polls(pbxs, src, present=False)
    started = time.monotonic()
    done = pbxs[0].ctl("unban", src)
    took = time.monotonic() - started
    lifted = delays(watching, started)
    first = min((d for d in lifted.values() if d is not None), default=0.0)
    for role, delay in lifted.items():  # the command's start-up is Python's, not the lift's
        timings.add(timings.lifts, role, None if delay is None else delay - first)
    answers = on_all(pbxs, lambda p: challenge(attacker, src, p, port))
    ok = (
        done.returncode == 0
        and all(d is not None for d in lifted.values())
        and set(answers.values()) == {401}
    )
    return Result(
        f"`fastagi-ctl unban {src}` on {pbxs[0].role} lifts it on every PBX",
        ok,
        f"lifted {listed(lifted)} after the command started (it took {ms(took)}); "
        f"REGISTER answers {answers}",
    )


def spread_round(
    pbxs: list[Pbx], attacker: Namespace, port: int, start: int, timings: Timings
) -> list[Result]:
    """THRESHOLD wrong-password REGISTERs from SPREAD, round robin over the PBXs (at most
    ceil(THRESHOLD / PBXs) < THRESHOLD on any one): every one answered, and the one that
    reaches the threshold gets SPREAD dropped on all PBXs."""
    by_role = {p.role: p for p in pbxs}
    plan = spread_plan(by_role, THRESHOLD, start)
    answers: list[tuple[str, int | None]] = []
    sent: list[float] = []
    watching: dict[str, Poll] = {}
    for n, role in enumerate(plan):
        if n == len(plan) - 1:  # the attempt that reaches the threshold: time it
            watching = polls(pbxs, SPREAD, present=True)
        ip = by_role[role].ns.ipv4
        answers.append((role, register_wrong_password(attacker, SPREAD, ip, port, sent)))
    failing = sent[-1] if len(sent) == THRESHOLD else time.monotonic()
    dropped = delays(watching, failing)
    for role, delay in dropped.items():
        timings.add(timings.drops, role, delay)
    most = max(plan.count(role) for role in by_role)
    ok = (
        all(code == 401 for _, code in answers)
        and most <= THRESHOLD - 1
        and all(d is not None for d in dropped.values())
    )
    return [
        Result(
            f"spread guesser, round {start + 1}: {THRESHOLD} wrong passwords over "
            f"{len(pbxs)} PBXs (at most {most} on one), the last to {plan[-1]}",
            ok,
            f"{SPREAD}: answers {', '.join(f'{role} {code}' for role, code in answers)}; "
            f"dropped {listed(dropped)} after the last one was sent",
        ),
        dropped_everywhere(pbxs, attacker, SPREAD, port),
        unban(pbxs, attacker, SPREAD, port, timings),
    ]


def svcrack(pbxs: list[Pbx], attacker: Namespace, port: int, timings: Timings) -> list[Result]:
    """sipvicious' svcrack against the first PBX's real account: dropped on all PBXs."""
    tool = shutil.which("svcrack") or shutil.which("sipvicious_svcrack")
    if tool is None:
        return [Result("svcrack banned on every PBX", False, "svcrack not installed")]
    target = pbxs[0]
    watching = polls(pbxs, SVCRACK_FROM, present=True)
    started = time.monotonic()
    run = attacker.run(
        [tool, "-u", USER, "-r", "1000-1099", "-p", str(port), target.ns.ipv4],
        check=False,
        timeout=120,
    )
    took = time.monotonic() - started
    dropped = delays(watching, started)
    first = min((d for d in dropped.values() if d is not None), default=None)
    status = json.loads(target.ctl("status", SVCRACK_FROM, "--json").stdout or "{}")
    holds = [h["source"] for h in status.get("holds", [])]
    ok = (
        all(d is not None for d in dropped.values())
        and "auth" in holds
        and "correct-horse" not in run.stdout
    )
    later = {r: None if d is None or first is None else d - first for r, d in dropped.items()}
    return [
        Result(
            f"svcrack against {target.role} banned on every PBX",
            ok,
            f"{SVCRACK_FROM}: dropped {ms(first)} after svcrack started, then on each PBX "
            f"{listed(later, '+')}; holds {holds}; svcrack ran {took:.0f} s",
        ),
        dropped_everywhere(pbxs, attacker, SVCRACK_FROM, port),
        unban(pbxs, attacker, SVCRACK_FROM, port, timings),
    ]


def run_checks(topo: Topology, work: Path, inst: Path, rounds: int) -> tuple[list[Result], Timings]:
    stacks = stacks_of(inst)
    port = stacks[-1].port  # PJSIP (on 20: beside chan_sip)
    redis = NamespaceRedis(topo.core, str(work / "redis"))
    (work / "redis").mkdir(parents=True, exist_ok=True)
    redis.start()
    pbxs: list[Pbx] = []
    results: list[Result] = []
    timings = Timings()
    try:
        for role in PBXS:
            pbxs.append(start_pbx(topo, role, work, inst, stacks, redis.url(4)))
        attacker = topo.attacker
        results.append(protected_set(pbxs))
        for start in range(rounds):
            results += spread_round(pbxs, attacker, port, start % len(pbxs), timings)
        results += svcrack(pbxs, attacker, port, timings)
    finally:
        for pbx in pbxs:
            pbx.asterisk.stop()
        (work / "results.json").write_text(
            json.dumps(
                {
                    "asterisk": asterisk_version(inst),
                    "results": [r.__dict__ for r in results],
                    "drops_s": timings.drops,
                    "lifts_s": timings.lifts,
                },
                indent=2,
            )
        )
    return results, timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asterisk", required=True, help="install prefix (PREFIX/inst)")
    parser.add_argument("--work", help="keep configs and logs here (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=3, help="spread-guesser rounds (timed)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("cluster.py: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    # a SIGTERM unwinds like ^C: every namespace and process goes, also on failure
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    inst = Path(args.asterisk).resolve()
    version = asterisk_version(inst)
    with workdir(args.work) as work:
        try:
            topo = make_topology(HOSTS)
            try:
                results, timings = run_checks(topo, work, inst, args.rounds)
            finally:
                topo.close()
        except RuntimeError as error:  # a part did not start (Asterisk and serve name their log)
            print(f"cluster.py: {error}", file=sys.stderr)
            return 1
    print(table(f"{version} (three PBXs, one Redis)", results))
    print()
    print(f"Timings over {args.rounds} spread rounds (each PBX's sets read every ~5 ms):")
    print()
    print(timings.text())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was removed on the way out
        sys.exit(130)
