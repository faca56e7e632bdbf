"""The FastAGI benchmark in one command: fastagi-screen against two peers, same work.

    python bench/run_all.py [--repeats 5] [--duration 2] [--quick]

Starts a real redis-server on a free loopback port, then three servers, each pinned
with redis to core 0 (`taskset -c 0`): ours (`fastagi-ctl serve --no-agent`, Redis
from FASTAGI_REDIS_URL, /metrics on), the pyst2-over-threads peer and the panoramisk
peer (bench/peers/). The generator (bench/agi_load.py, FakeAsterisk's wire format) runs
pinned to core 1. Each configuration is ONE generator invocation that runs the servers
round robin for --repeats rounds, FLUSHALL before each run, so ratios compare like with
like; the table shows medians. Then, for ours: (a) C=10 with 200 idle connections held
open vs plain, and when the server closed them; (b) 1M distinct caller addresses vs 1k;
(c) RSS with 1,000 sessions held mid-dialogue (fresh instances, all three servers).

Everything listens on 127.0.0.1 only; every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER_CORE, GENERATOR_CORE = "0", "1"
SESSION_TIMEOUT = "3s"  # ours, for the run: idle connections must close within a run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read /proc, never connect: a bare
    connect-and-close makes panoramisk 1.4 spin forever."""
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(needle.strip()) and fields[3] == "0A":
                return True
    return False


def pinned(core: str, *argv: str) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") else list(argv)


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(
        self, name: str, argv: list[str], port: int, env: dict | None = None, wait: float = 20
    ) -> int:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        self.procs[name] = proc
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.workdir / (name + '.log')}")
            if listening(port):
                time.sleep(0.2)
                return proc.pid
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not listen on {port}")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def start_redis(procs: Processes, name: str, workdir: Path) -> tuple[str, int]:
    """A throw-away redis-server pinned to the server core: (url, pid)."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(workdir)]
    pid = procs.start(name, pinned(SERVER_CORE, *argv), port)
    return f"redis://127.0.0.1:{port}/0", pid


def start_servers(
    procs: Processes,
    redis_url: str,
    tag: str,
    session_timeout: str,
    metrics_port: int | None,
) -> dict[str, tuple[str, int]]:
    """ours, pyst2 and pano on free ports, pinned to the server core: name -> (url, pid)."""
    servers = {}
    port = free_port()
    env = {
        "FASTAGI_REDIS_URL": redis_url,
        "FASTAGI_SERVER_LISTEN": f"127.0.0.1:{port}",
        "FASTAGI_SERVER_MAX_SESSIONS": "4096",
        "FASTAGI_SERVER_SESSION_TIMEOUT": session_timeout,
        "FASTAGI_RUNTIME_DIR": str(procs.workdir),
        # memory://: the embedded store's saved state stays in the bench's own directory
        "FASTAGI_SERVER_STATE_DIR": str(procs.workdir / "state"),
        "FASTAGI_SCREENING_PBX_ID": "bench",
        "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{metrics_port}" if metrics_port else "",
    }
    ctl = shutil.which("fastagi-ctl")
    argv = [ctl] if ctl else [sys.executable, "-m", "fastagi.cli"]
    pid = procs.start(f"ours{tag}", pinned(SERVER_CORE, *argv, "serve", "--no-agent"), port, env)
    servers["ours"] = (f"agi://127.0.0.1:{port}/screen", pid)
    for name, script in (("pyst2", "pyst2_threads.py"), ("pano", "panoramisk_fastagi.py")):
        port = free_port()
        argv = pinned(
            SERVER_CORE,
            sys.executable,
            str(HERE / "peers" / script),
            "--listen",
            f"127.0.0.1:{port}",
            "--redis",
            redis_url,
        )
        servers[name] = (f"agi://127.0.0.1:{port}/screen", procs.start(f"{name}{tag}", argv, port))
    return servers


def generate(
    targets: list[tuple[str, str, int]], redis: tuple[str, int], *options: str, timeout: float = 300
) -> dict:
    argv = [
        sys.executable,
        str(HERE / "agi_load.py"),
        "--json",
        "--flush",
        redis[0],
        "--pid",
        f"redis={redis[1]}",
        *options,
    ]
    for name, spec, pid in targets:
        argv += ["--target", f"{name}={spec}", "--pid", f"{name}={pid}"]
    proc = subprocess.run(
        pinned(GENERATOR_CORE, *argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=250.0, help="open-loop rate, sessions/s")
    parser.add_argument("--quick", action="store_true", help="1 s runs, 3 repeats")
    parser.add_argument("--json", metavar="PATH", help="also write every result here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.duration = 3, 1.0
    if not shutil.which("redis-server"):
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="fastagi-bench-"))
    procs = Processes(workdir)
    started = time.monotonic()
    results: dict = {}
    try:
        redis = start_redis(procs, "redis", workdir)
        metrics_port = free_port()
        servers = start_servers(procs, redis[0], "", SESSION_TIMEOUT, metrics_port)
        all3 = [(name, url, pid) for name, (url, pid) in servers.items()]
        common = ["--repeats", str(args.repeats), "--duration", str(args.duration)]

        for c in (1, 10, 100):
            results[f"C={c}"] = generate(all3, redis, "--concurrency", str(c), *common)
            print(f"# C={c} done ({time.monotonic() - started:.0f}s)", file=sys.stderr)
        results["open"] = generate(all3, redis, "--rate", str(args.rate), *common)

        ours_url, ours_pid = servers["ours"]
        idle_time = str(max(args.duration, 4.0))  # > session_timeout: the idle ones close
        results["idle"] = generate(
            [("plain", ours_url, ours_pid), ("idle200", ours_url + "|slowloris=200", ours_pid)],
            redis,
            "--concurrency",
            "10",
            "--repeats",
            "3",
            "--duration",
            idle_time,
        )
        results["addresses"] = generate(
            [
                ("1k", ours_url + "|addresses=1000", ours_pid),
                ("1M", ours_url + "|addresses=1000000", ours_pid),
            ],
            redis,
            "--concurrency",
            "10",
            *common,
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            scraped = r.read().decode()
        procs.stop_all()

        # (c) fresh instances, sessions held mid-dialogue (ours with a long session_timeout)
        redis = start_redis(procs, "redis-rss", workdir)
        fresh = start_servers(procs, redis[0], "-rss", "60s", None)
        results["rss"] = generate(
            [(name, url, pid) for name, (url, pid) in fresh.items()],
            redis,
            "--hold",
            "1000",
            "--hold-limit",
            "30",
            "--addresses",
            "1000000",
        )
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - started
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(render(results, scraped, args, elapsed))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def render(results: dict, scraped: str, args: argparse.Namespace, elapsed: float) -> str:
    out = [
        f"FastAGI screening, {args.repeats} x {args.duration:g} s per cell, medians; servers "
        f"+ redis on core {SERVER_CORE}, generator on core {GENERATOR_CORE}; "
        f"{os.cpu_count()} CPUs, run took {elapsed:.0f} s",
        "",
        "| load | ours sess/s | p50 / p99 ms | pyst2-threads sess/s | p50 / p99 ms "
        "| panoramisk sess/s | p50 / p99 ms | ours/pyst2 | ours/pano | CPU us/session "
        "ours / pyst2 / pano |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("C=1", "C=10", "C=100", "open"):
        t = results[key]["targets"]
        o, p, a = t["ours"], t["pyst2"], t["pano"]
        label = f"open {args.rate:g}/s" if key == "open" else key
        out.append(
            f"| {label} | {o['rate']:.0f} | {fmt(o['p50_ms'])} / {fmt(o['p99_ms'])} "
            f"| {p['rate']:.0f} | {fmt(p['p50_ms'])} / {fmt(p['p99_ms'])} "
            f"| {a['rate']:.0f} | {fmt(a['p50_ms'])} / {fmt(a['p99_ms'])} "
            f"| {o['rate'] / p['rate']:.2f}x | {o['rate'] / a['rate']:.2f}x "
            f"| {o.get('cpu_us', 0):.0f} / {p.get('cpu_us', 0):.0f} / {a.get('cpu_us', 0):.0f} |"
        )
    errors = {
        k: {n: r["errors"] for n, r in results[k]["targets"].items()}
        for k in ("C=1", "C=10", "C=100", "open")
    }
    out.append("")
    out.append(f"errors per cell: {errors}")
    idle = results["idle"]["targets"]
    closes = [s for s in idle["idle200"].get("slowloris", []) if s]
    closed = sum(s["closed_by_server"] for s in closes)
    opened = sum(s["opened"] for s in closes)
    lo = min((s["held_min_s"] for s in closes if s["held_min_s"] is not None), default=None)
    hi = max((s["held_max_s"] for s in closes if s["held_max_s"] is not None), default=None)
    out.append(
        f"(a) C=10 with 200 idle connections held open: {idle['idle200']['rate']:.0f} sess/s vs "
        f"{idle['plain']['rate']:.0f} plain "
        f"({idle['idle200']['rate'] / idle['plain']['rate']:.2f}x); "
        f"idle connections opened {opened}, closed by the server {closed} after "
        f"{fmt(lo, 2)}-{fmt(hi, 2)} s (session_timeout {SESSION_TIMEOUT}; the rest were "
        f"still inside their timeout when the run ended); p99 {fmt(idle['idle200']['p99_ms'])} "
        f"vs {fmt(idle['plain']['p99_ms'])} ms"
    )
    addr = results["addresses"]["targets"]
    out.append(
        f"(b) C=10, 1M distinct caller addresses: {addr['1M']['rate']:.0f} sess/s vs "
        f"{addr['1k']['rate']:.0f} with 1k ({addr['1M']['rate'] / addr['1k']['rate']:.2f}x); "
        f"results 1M {addr['1M']['results']}, 1k {addr['1k']['results']}"
    )
    rss = results["rss"]["hold"]
    out.append(
        "(c) RSS with 1,000 sessions held mid-dialogue: "
        + "; ".join(
            f"{name} {h['rss_idle_mb']} MB idle -> {h['rss_held_mb']} MB "
            f"({h['held']} held, {h['completed']} completed)"
            for name, h in rss.items()
        )
    )
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in scraped.splitlines()
        if line.startswith("fastagi_sessions_total{")
    )
    out.append(f"ours /metrics: fastagi_sessions_total = {total:.0f} over the whole run")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
