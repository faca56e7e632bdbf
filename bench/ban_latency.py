"""Ban propagation latency: from the call that bans to the first dropped packet, per PBX.

    sudo python bench/ban_latency.py --bans 100
    sudo python bench/ban_latency.py --bans 100 --load 100000 --backends nftables,ipset

Builds network namespaces (tests/netns.py): a real redis-server in `core`, one
`fastagi-ctl agent` per PBX namespace (pbx1, pbx2, ...), and an attacker that sends UDP
probes to every PBX every --interval seconds, each carrying a sequence number that the
PBX's echo returns. For each ban the benchmark takes t0, makes the threshold-hitting
call (`--via screen`: the screening step of the N-th call, exactly what the FastAGI
server runs; `--via ban`: what `fastagi-ctl ban` runs) and, per PBX, finds the first
probe that never came back: latency = its send time - t0 (resolution: --interval). It
then unbans, waits until probes pass again, and goes on, alternating IPv4 and IPv6.
`--load N` first puts N other bans on the list and waits until every PBX's firewall
holds them, so the latency is measured with that ban list in place.

Needs root (namespaces, firewalls); touches nothing outside the namespaces it makes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastagi import config as configuration  # noqa: E402
from fastagi.keys import Keys  # noqa: E402
from fastagi.service import make_store  # noqa: E402
from fastagi.store import redis_client  # noqa: E402
from tests.netns import NamespaceRedis, Topology, make_topology  # noqa: E402

PROBE = struct.Struct("!IQ")  # pbx index, sequence number
PORT = 5060
QUIET = 0.25  # no echo for this long after a probe: that probe was dropped
KEYS = Keys()
SOURCES = ["192.0.2.10", "2001:db8::10", "192.0.2.11", "2001:db8::11", "192.0.2.12", "2001:db8::12"]


class Prober:
    """Sends numbered probes from one attacker address to every PBX; notes the echoes."""

    def __init__(self, topo: Topology, pbxs: list[str], interval: float) -> None:
        self.topo = topo
        self.pbxs = pbxs
        self.interval = interval
        self.socks: dict[str, socket.socket] = {}
        for source in SOURCES:
            family = socket.AF_INET6 if ":" in source else socket.AF_INET
            sock = topo.attacker.socket(family, socket.SOCK_DGRAM)
            sock.bind((source, 0))
            sock.settimeout(0.1)
            self.socks[source] = sock
        self.active: str | None = None
        self.seq = 0
        self.lock = threading.Lock()
        self.sent: list[dict[int, float]] = [{} for _ in pbxs]
        self.last_echo: list[int] = [-1 for _ in pbxs]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True)]
        self.threads += [
            threading.Thread(target=self._receive, args=(s,), daemon=True)
            for s in self.socks.values()
        ]
        for thread in self.threads:
            thread.start()

    def switch(self, source: str) -> None:
        with self.lock:
            self.active = source
            self.sent = [{} for _ in self.pbxs]
            self.last_echo = [-1 for _ in self.pbxs]

    def _send(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                source = self.active
                if source is not None:
                    sock = self.socks[source]
                    family = 6 if ":" in source else 4
                    seq = self.seq
                    self.seq += 1
                    for i, pbx in enumerate(self.pbxs):
                        self.sent[i][seq] = time.perf_counter()
                        with contextlib.suppress(OSError):
                            sock.sendto(PROBE.pack(i, seq), (self.topo[pbx].address(family), PORT))
            time.sleep(self.interval)

    def _receive(self, sock: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                data = sock.recv(64)
            except (TimeoutError, OSError):
                continue
            if len(data) != PROBE.size:
                continue
            i, seq = PROBE.unpack(data)
            with self.lock:
                if i < len(self.last_echo) and seq > self.last_echo[i]:
                    self.last_echo[i] = seq

    def first_dropped(self, i: int) -> float | None:
        """Send time of the probe after the last echo, once QUIET has passed without one."""
        with self.lock:
            sent = self.sent[i].get(self.last_echo[i] + 1)
        if sent is None or time.perf_counter() - sent < QUIET:
            return None
        return sent

    def passing(self, since_seq: int) -> bool:
        with self.lock:
            return all(echo > since_seq for echo in self.last_echo)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(1)
        for sock in self.socks.values():
            sock.close()


def kernel_count(ns, backend: str) -> int:
    if backend == "nftables":
        total = 0
        for name in ("ban4", "ban6"):
            out = ns.run(["nft", "-j", "list", "set", "inet", "fastagi", name], check=False).stdout
            for item in json.loads(out or "{}").get("nftables", []):
                total += len(item.get("set", {}).get("elem", []))
        return total
    if backend == "ipset":
        total = 0
        for name in ("fastagi-v4", "fastagi-v6"):
            out = ns.run(["ipset", "list", "-t", name], check=False).stdout
            found = re.search(r"Number of entries:\s*(\d+)", out)
            total += int(found.group(1)) if found else 0
        return total
    out = ns.run("iptables-legacy -w -S FASTAGI; ip6tables-legacy -w -S FASTAGI", check=False)
    return out.stdout.count(" -j DROP")


def preload(client, count: int) -> None:
    """count bans (a tenth IPv6) on the list, as the ban script writes them, in bulk."""
    until = int((time.time() + 7200) * 1000)
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        if i % 10 == 9:
            ip = str(ipaddress.IPv6Address("2001:db8:ff::") + i)
        else:
            ip = str(ipaddress.IPv4Address("198.18.0.0") + i)
        pipe.zadd(KEYS.banned, {ip: until})
        pipe.xadd(
            KEYS.events,
            {"op": "ban", "ip": ip, "until": until, "pbx_id": "bench", "reason": "load"},
            maxlen=10_000,
            approximate=True,
        )
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def measure(args, topo: Topology, redis: NamespaceRedis, backend: str, pbxs) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}
    env.update(
        {
            "FASTAGI_FIREWALL_BACKEND": backend,
            "FASTAGI_FIREWALL_SYNC_INTERVAL": args.sync_interval,
            "FASTAGI_LOG_LEVEL": "WARNING",
        }
    )
    client = redis.client()
    client.flushall()
    logs = Path(args.logs)
    procs = []
    for pbx in pbxs:
        log = open(logs / f"agent-{backend}-{pbx}.log", "w")  # noqa: SIM115
        procs.append(
            topo[pbx].spawn(
                [sys.executable, "-m", "fastagi.cli", "agent"],
                env={**env, "FASTAGI_REDIS_URL": redis.url(4), "FASTAGI_SCREENING_PBX_ID": pbx},
                stdout=log,
                stderr=log,
            )
        )
        log.close()
    deadline = time.monotonic() + 30
    while len(client.hgetall(KEYS.agents)) < len(pbxs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"agents did not start: see {logs}")
        time.sleep(0.1)

    held, load_time = 0, 0.0
    if args.load:
        started = time.monotonic()
        preload(client, args.load)
        while True:
            counts = [kernel_count(topo[p], backend) for p in pbxs]
            if all(c >= args.load for c in counts):
                break
            if time.monotonic() - started > args.load_timeout:
                break
            time.sleep(1.0)
        held, load_time = min(counts), time.monotonic() - started

    config = configuration.load(
        None,
        {
            "FASTAGI_REDIS_URL": redis.unix_url,
            "FASTAGI_SCREENING_THRESHOLD": "3",
            "FASTAGI_SCREENING_PBX_ID": "bench",
            "FASTAGI_SCREENING_BAN_TIME": "10m",
        },
    )
    store = make_store(config, redis_client(config.redis))
    prober = Prober(topo, pbxs, args.interval)
    latencies: list[float] = []
    unban_latencies: list[float] = []
    missed = 0
    try:
        for n in range(args.bans):
            source = SOURCES[n % len(SOURCES)]
            prober.switch(source)
            deadline = time.monotonic() + 5
            while not prober.passing(-1):  # the path works (and ARP/ND is done)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"probes from {source} do not pass before the ban")
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)
            if args.via == "screen":
                for _ in range(config.screening.threshold - 1):
                    await store.screen(source)
                t0 = time.perf_counter()
                verdict = await store.screen(source)
                assert verdict.result == "BANNED", verdict
            else:
                t0 = time.perf_counter()
                await store.ban(source, 600, "bench")
            deadline = time.monotonic() + 5
            firsts: list[float | None] = [None] * len(pbxs)
            while time.monotonic() < deadline and None in firsts:
                for i in range(len(pbxs)):
                    if firsts[i] is None:
                        firsts[i] = prober.first_dropped(i)
                await asyncio.sleep(0.005)
            for first in firsts:
                if first is None:
                    missed += 1
                else:
                    latencies.append(max(0.0, first - t0))
            with prober.lock:
                mark = prober.seq
            t1 = time.perf_counter()
            await store.unban([source])
            deadline = time.monotonic() + 5
            while not prober.passing(mark):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{source} still blocked 5s after unban")
                await asyncio.sleep(0.002)
            unban_latencies.append(time.perf_counter() - t1)
    finally:
        prober.close()
        await store.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        for pbx in pbxs:  # our firewall goes with the namespaces; remove it anyway
            topo[pbx].run(
                [sys.executable, str(ROOT / "bench" / "ban_latency.py"), "--teardown", backend],
                check=False,
                timeout=120,
            )
    return {
        "backend": backend,
        "samples": len(latencies),
        "missed": missed,
        "p50": pct(latencies, 50) if latencies else float("nan"),
        "p99": pct(latencies, 99) if latencies else float("nan"),
        "max": max(latencies) if latencies else float("nan"),
        "unban_p50": statistics.median(unban_latencies) if unban_latencies else float("nan"),
        "held": held,
        "load_time": load_time,
    }


def teardown(backend: str) -> None:
    from fastagi.firewall import FirewallSettings, create

    create(FirewallSettings(backend=backend)).teardown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bans", type=int, default=100, help="bans per backend (default 100)")
    parser.add_argument("--backends", default="iptables,nftables,ipset")
    parser.add_argument("--pbxs", type=int, default=2, help="PBX namespaces (default 2)")
    parser.add_argument("--via", choices=["screen", "ban"], default="screen")
    parser.add_argument("--interval", type=float, default=0.0005, help="probe interval (s)")
    parser.add_argument("--load", type=int, default=0, help="other bans on the list first")
    parser.add_argument("--load-timeout", type=float, default=180)
    parser.add_argument("--sync-interval", default="30s", help="the agents' sync_interval")
    parser.add_argument("--logs", default="", help="directory for agent logs (default: temp)")
    parser.add_argument("--teardown", metavar="BACKEND", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.teardown:
        teardown(args.teardown)
        return 0
    if os.geteuid() != 0:
        print("ban_latency: needs root (network namespaces, firewalls)", file=sys.stderr)
        return 2
    hosts = {"attacker": (10, (11, 12))}
    pbxs = [f"pbx{i}" for i in range(1, args.pbxs + 1)]
    hosts.update({pbx: (20 + i, ()) for i, pbx in enumerate(pbxs, 1)})
    work = tempfile.mkdtemp(prefix="ban-latency-")
    args.logs = args.logs or work
    topo = make_topology(hosts)
    rows = []
    try:
        redis = NamespaceRedis(topo.core, work)
        redis.start()
        for pbx in pbxs:
            topo[pbx].udp_echo(PORT)
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            row = asyncio.run(measure(args, topo, redis, backend, pbxs))
            rows.append(row)
            print(
                f"  {backend}: p50 {row['p50'] * 1000:.1f} ms, p99 {row['p99'] * 1000:.1f} ms",
                file=sys.stderr,
            )
        redis.kill()
    finally:
        topo.close()
    via = "screening step" if args.via == "screen" else "ban"
    print(
        f"\nban -> first dropped packet, {args.bans} bans x {len(pbxs)} PBXs per backend "
        f"(via {via}; IPv4/IPv6 alternating; probe every {args.interval * 1000:g} ms; "
        f"sync_interval {args.sync_interval}; {args.load} other bans loaded)\n"
    )
    print(
        "| backend  | samples | p50 ms | p99 ms | max ms | missed | unban p50 ms | ban list held |"
        "\n"
        "|----------|--------:|-------:|-------:|-------:|-------:|-------------:|--------------:|"
    )
    for r in rows:
        held = f"{r['held']:,} ({r['load_time']:.0f}s)" if args.load else "-"
        print(
            f"| {r['backend']:<8} | {r['samples']:>7} | {r['p50'] * 1000:6.1f} | "
            f"{r['p99'] * 1000:6.1f} | {r['max'] * 1000:6.1f} | {r['missed']:>6} | "
            f"{r['unban_p50'] * 1000:12.1f} | {held:>13} |"
        )
    ok = all(r["missed"] == 0 and r["p99"] <= 0.1 for r in rows)
    print(f"\ntarget p99 <= 100 ms: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
