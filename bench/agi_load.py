"""FastAGI load generator: plays Asterisk (fastagi.emulator) against one or more servers.

    python bench/agi_load.py --target ours=agi://127.0.0.1:4573/screen \
        [--target peer=agi://127.0.0.1:4574/screen ...] \
        [--concurrency 10 | --rate 500] [--duration 2] [--repeats 3] \
        [--addresses 1000] [--slowloris 200] [--hold 1000 --pid NAME=PID] [--json]

Every session is `FakeAsterisk`'s dialogue: the environment block written as res_agi
writes it (one write per line, LF only, no TCP_NODELAY: `emulator.LineWriter`), each
answer one write, commands answered like Asterisk 20
(GET FULL VARIABLE with channel functions, EXEC Log, SET VARIABLE, HANGUP after the
server's close). Modes:

- closed loop (`--concurrency C`): C sessions always in flight; latency per session;
- open loop (`--rate R`): sessions start on a fixed schedule; latency counts from the
  scheduled start, so a server that falls behind is charged for the queue;
- `--slowloris N`: N idle connections held open next to the load (each reopened when
  the server closes it); reports when the server closed them;
- `--hold N --pid NAME=PID`: N sessions held mid-dialogue (the server's first command
  unanswered) to read the server's RSS, then released.

With several targets, each repeat runs them back to back (round robin), so every
target sees the same machine state; medians over the repeats. Callers' addresses come
from a pool of `--addresses` distinct IPv4 addresses in 100.64.0.0/10, picked at random
(an integer turned into dotted form: no per-call object beyond the string).
Every loop is bounded by `--duration` and by --max-sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastagi.emulator import (
    Call,
    CallResult,
    FakeAsterisk,
    LineWriter,
    environment_lines,
    expand,
    split_words,
)

POOL_BASE = struct.unpack("!I", socket.inet_aton("100.64.0.0"))[0]  # a /10: 4M addresses
MAX_POOL = 1 << 22
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FAITHFUL = False  # --faithful: the full FakeAsterisk dialogue (slower generator)


class AddressPool:
    """`size` distinct caller addresses, generated on demand (nothing stored)."""

    def __init__(self, size: int, seed: int = 7) -> None:
        if not 1 <= size <= MAX_POOL:
            raise ValueError(f"address pool between 1 and {MAX_POOL}")
        self.size = size
        self.random = random.Random(seed)

    def pick(self) -> str:
        return socket.inet_ntoa(struct.pack("!I", POOL_BASE + self.random.randrange(self.size)))


class _LeanSession(asyncio.Protocol):
    """One session's Asterisk side on a bare asyncio Protocol (no streams)."""

    def __init__(self, owner: LeanAsterisk, call: Call, url: str, done: asyncio.Future) -> None:
        self.owner, self.call, self.url, self.done = owner, call, url, done
        self.variables = call.functions()
        self.result = CallResult()
        self.buffer = b""
        self.lines: LineWriter | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.lines = LineWriter(transport)
        for line in environment_lines(self.call, self.url, 1):
            self.lines.write(line)  # one write per line, as res_agi does

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        lines = self.buffer.split(b"\n")
        self.buffer = lines.pop()
        for raw in lines[:64]:
            self.lines.write_answer(
                self.owner.answer(raw.decode(), self.call, self.variables, self.result)
            )

    def eof_received(self) -> bool:
        self.lines.write(b"HANGUP\n")  # AGISIGHUP=yes: after the server's close
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.result)


class LeanAsterisk(FakeAsterisk):
    """FakeAsterisk's wire behaviour with a cheaper client (a bare Protocol), so one
    generator core outruns the server under test: the same env block
    (`environment_lines`, one write each), the same answers for the commands a screening
    dialogue uses (GET FULL VARIABLE / GET VARIABLE with channel functions, SET
    VARIABLE, EXEC Log), every other command through `FakeAsterisk._execute`, and HANGUP
    after the server's close. One command at a time, as the server under test sends."""

    async def call(self, target: str, call: Call | None = None) -> CallResult:
        call = call or Call()
        parts = urlsplit(target)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda: _LeanSession(self, call, target, done), parts.hostname, parts.port or 4573
        )
        try:
            async with asyncio.timeout(self.hold_limit):
                return await done
        finally:
            transport.close()

    def answer(self, line: str, call: Call, variables: dict, result: CallResult) -> str:
        if line.startswith("GET FULL VARIABLE "):
            words = split_words(line)
            return f"200 result=1 ({expand(words[3], variables)})\n"
        if line.startswith("SET VARIABLE "):
            words = split_words(line)
            result.variables[words[2]] = variables[words[2]] = words[3]
            return "200 result=1\n"
        if line.startswith("EXEC Log "):
            return "200 result=0\n"
        if line.startswith("GET VARIABLE "):
            value = variables.get(split_words(line)[2])
            return f"200 result=1 ({value})\n" if value else "200 result=0\n"
        return self._execute(line, call, variables, result, False)


class Target:
    """`NAME=agi://HOST:PORT/ROUTE[|addresses=N][|slowloris=N]`: options per target, so
    one invocation can compare e.g. the same server with and without idle connections."""

    def __init__(self, spec: str, addresses: int, slowloris: int) -> None:
        self.name, _, rest = spec.partition("=")
        self.url, *options = rest.split("|")
        settings = dict(option.split("=", 1) for option in options)
        self.addresses = int(settings.get("addresses", addresses))
        self.slowloris = int(settings.get("slowloris", slowloris))
        self.pid = 0
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 4573


class Load:
    """Sessions against one target, with their latencies and results."""

    def __init__(self, target: Target, pool: AddressPool, hold_limit: float) -> None:
        self.target = target
        self.pool = pool
        self.asterisk = (FakeAsterisk if FAITHFUL else LeanAsterisk)(hold_limit=hold_limit)
        self.latencies: list[float] = []
        self.results: Counter[str] = Counter()
        self.errors = 0

    async def session(self, scheduled: float | None = None) -> None:
        started = time.perf_counter() if scheduled is None else scheduled
        try:
            result = await self.asterisk.call(self.target.url, Call(source=self.pool.pick()))
        except (OSError, asyncio.IncompleteReadError):
            self.errors += 1
            return
        self.latencies.append(time.perf_counter() - started)
        self.results[result.variables.get("SCREEN_RESULT", "none")] += 1


def summary(load: Load, seconds: float) -> dict:
    lat = sorted(load.latencies)
    n = len(lat)
    return {
        "sessions": n,
        "seconds": round(seconds, 3),
        "rate": n / seconds if seconds else 0.0,
        "p50_ms": 1000 * lat[n // 2] if n else None,
        "p99_ms": 1000 * lat[min(n - 1, int(n * 0.99))] if n else None,
        "errors": load.errors,
        "results": dict(load.results),
    }


async def closed_loop(load: Load, concurrency: int, duration: float, max_sessions: int) -> dict:
    deadline = time.perf_counter() + duration
    budget = [max_sessions]

    async def worker() -> None:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            await load.session()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(load, time.perf_counter() - started)


async def open_loop(load: Load, rate: float, duration: float, max_in_flight: int) -> dict:
    """Start sessions at `rate`/s; latency from each scheduled start."""
    total = int(rate * duration)
    started = time.perf_counter()
    tasks: set[asyncio.Task] = set()
    skipped = 0
    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            skipped += 1  # the server is this far behind: count, do not pile up
            continue
        task = asyncio.create_task(load.session(scheduled=due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=load.asterisk.hold_limit)
    out = summary(load, time.perf_counter() - started)
    out["offered_rate"] = rate
    out["skipped"] = skipped
    return out


class Slowloris:
    """N idle connections kept open: each sends nothing and waits for the server to close."""

    def __init__(self, target: Target, count: int) -> None:
        self.target, self.count = target, count
        self.held: list[float] = []  # seconds each connection lasted until the server closed it
        self.opened = 0
        self.refused = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _one(self) -> None:
        for _ in range(1000):  # reopen after each server close, boundedly
            if self._stop.is_set():
                return
            try:
                reader, writer = await asyncio.open_connection(self.target.host, self.target.port)
            except OSError:
                self.refused += 1
                await asyncio.sleep(0.1)
                continue
            self.opened += 1
            opened = time.perf_counter()
            stop = asyncio.ensure_future(self._stop.wait())
            read = asyncio.ensure_future(reader.read())
            done, _ = await asyncio.wait({stop, read}, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                self.held.append(time.perf_counter() - opened)
                stop.cancel()
            else:
                read.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._one()) for _ in range(self.count)]
        for _ in range(200):  # wait until all are connected (bounded)
            if self.opened >= self.count:
                break
            await asyncio.sleep(0.01)

    async def stop(self) -> dict:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        held = sorted(self.held)
        return {
            "idle": self.count,
            "opened": self.opened,
            "closed_by_server": len(held),
            "held_min_s": round(held[0], 3) if held else None,
            "held_max_s": round(held[-1], 3) if held else None,
            "refused": self.refused,
        }


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return 0.0


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class HoldingAsterisk(FakeAsterisk):
    """Holds every session at the server's first command until released."""

    def __init__(self, hold_limit: float) -> None:
        super().__init__(hold_limit)
        self.waiting = 0
        self.release = asyncio.Event()
        self._seen: set[int] = set()

    async def _write(self, writer, text):  # type: ignore[override]
        if id(writer) not in self._seen:
            self._seen.add(id(writer))
            self.waiting += 1
            await self.release.wait()
        await FakeAsterisk._write(writer, text)


async def hold(target: Target, pool: AddressPool, count: int, pid: int, limit: float) -> dict:
    """RSS of the server idle, then with `count` sessions in flight mid-dialogue."""
    before = rss_kb(pid)
    asterisk = HoldingAsterisk(hold_limit=limit)
    tasks = [
        asyncio.create_task(asterisk.call(target.url, Call(source=pool.pick())))
        for _ in range(count)
    ]
    deadline = time.perf_counter() + limit / 2
    while asterisk.waiting < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    during = rss_kb(pid)
    in_flight = asterisk.waiting
    asterisk.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = sum(1 for r in results if not isinstance(r, BaseException) and r.variables)
    return {
        "held": in_flight,
        "rss_idle_mb": round(before / 1024, 1),
        "rss_held_mb": round(during / 1024, 1),
        "completed": ok,
    }


def median_of(runs: list[dict]) -> dict:
    keys = ("rate", "p50_ms", "p99_ms", "cpu_us", "redis_cpu_us", "gen_cpu_us")
    out = {
        k: statistics.median(r[k] for r in runs if r.get(k) is not None)
        for k in keys
        if any(r.get(k) is not None for r in runs)
    }
    out["runs"] = [round(r["rate"]) for r in runs]
    out["sessions"] = sum(r["sessions"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    results: Counter[str] = Counter()
    for r in runs:
        results.update(r["results"])
    out["results"] = dict(results)
    if any("closed_by_server" in r for r in runs):
        out["slowloris"] = [r.get("slowloris") for r in runs]
    return out


async def run(args: argparse.Namespace) -> dict:
    pids = dict(spec.split("=", 1) for spec in args.pid)
    targets = [Target(spec, args.addresses, args.slowloris) for spec in args.target]
    pools = {t.name: AddressPool(t.addresses) for t in targets}
    for target in targets:
        target.pid = int(pids.get(target.name, 0))
    redis_pid = int(pids.get("redis", 0))
    report: dict = {"config": vars(args).copy()}
    if args.hold:
        report["hold"] = {
            t.name: await hold(t, pools[t.name], args.hold, t.pid, args.hold_limit) for t in targets
        }
        return report
    runs: dict[str, list[dict]] = {t.name: [] for t in targets}
    for repeat in range(args.repeats):
        order = targets[repeat % len(targets) :] + targets[: repeat % len(targets)]
        for target in order:
            if args.flush:
                await _flush(args.flush)
            load = Load(target, pools[target.name], hold_limit=args.hold_limit)
            slow = Slowloris(target, target.slowloris) if target.slowloris else None
            if slow:
                await slow.start()
            cpu = (cpu_seconds(target.pid), cpu_seconds(redis_pid), time.process_time())
            if args.rate:
                result = await open_loop(load, args.rate, args.duration, args.max_in_flight)
            else:
                result = await closed_loop(load, args.concurrency, args.duration, args.max_sessions)
            n = max(1, result["sessions"])
            result["gen_cpu_us"] = 1e6 * (time.process_time() - cpu[2]) / n
            if target.pid:
                result["cpu_us"] = 1e6 * (cpu_seconds(target.pid) - cpu[0]) / n
            if redis_pid:
                result["redis_cpu_us"] = 1e6 * (cpu_seconds(redis_pid) - cpu[1]) / n
            if slow:
                result["slowloris"] = await slow.stop()
                result["closed_by_server"] = result["slowloris"]["closed_by_server"]
            runs[target.name].append(result)
            await asyncio.sleep(args.pause)
    report["targets"] = {name: median_of(r) for name, r in runs.items()}
    return report


async def _flush(url: str) -> None:
    """FLUSHALL between runs so every target starts from the same Redis."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="NAME=agi://HOST:PORT/ROUTE[|addresses=N][|slowloris=N]",
    )
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop, sessions/s")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--addresses", type=int, default=1000)
    parser.add_argument("--slowloris", type=int, default=0)
    parser.add_argument("--hold", type=int, default=0)
    parser.add_argument(
        "--pid",
        action="append",
        default=[],
        metavar="NAME=PID",
        help="server process of target NAME (or `redis`): CPU time per session",
    )
    parser.add_argument("--hold-limit", type=float, default=20.0)
    parser.add_argument("--max-sessions", type=int, default=200_000)
    parser.add_argument("--max-in-flight", type=int, default=2000)
    parser.add_argument("--pause", type=float, default=0.2)
    parser.add_argument("--flush", metavar="REDIS_URL", help="FLUSHALL before each run")
    parser.add_argument("--faithful", action="store_true", help="full FakeAsterisk dialogue")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    global FAITHFUL
    FAITHFUL = args.faithful
    if args.duration > 120 or args.repeats > 50:
        parser.error("--duration at most 120 s, --repeats at most 50")
    # uvloop (a product dependency) so the generator, not the servers, is not the limit
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(run(args))
    else:
        report = uvloop.run(run(args))
    if args.json:
        print(json.dumps(report))
    else:
        for name, r in report.get("targets", {}).items():
            print(
                f"{name}: {r['rate']:.0f} sessions/s  p50 {r['p50_ms']:.2f} ms  "
                f"p99 {r['p99_ms']:.2f} ms  cpu {r.get('cpu_us', 0):.0f} us "
                f"redis {r.get('redis_cpu_us', 0):.0f} us gen {r.get('gen_cpu_us', 0):.0f} us  "
                f"runs {r['runs']}  errors {r['errors']}  "
                f"{r['results']}" + (f"  slowloris {r['slowloris']}" if "slowloris" in r else "")
            )
        for name, h in report.get("hold", {}).items():
            print(f"{name}: {h}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
