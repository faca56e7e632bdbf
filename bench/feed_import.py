"""A 100,000-entry blocklist, end to end: HTTP -> parse -> Redis holds -> nftables.

    python bench/feed_import.py [--entries 100000] [--cidrs 0] [--chunk 250]

In a network namespace of its own (needs root): a redis-server on a Unix socket, the
list (one IPv4 address per line, plus --cidrs /24s) served over HTTP on the namespace's
loopback, an agent with the nftables backend, and one feed refresh as `serve` runs it
(fetch, then apply, as FeedRunner.refresh does). Measured: fetch and parse; the store's
writes (chunks of one script each, pipelined, then one `sync` event naming the batch);
from that event to the kernel holding the batch (the agent reads the batch, checks each
entry, one firewall transaction); and the firewall call itself. Then the same for a
second refresh, which lengthens every hold. Also counts the firewall calls the agent
made: one batch means one add() (set() before the batch: the whole list rewritten).

Everything runs inside the namespace and a temporary directory, both removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _serve(body: bytes) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


async def _inner(redis_url: str, entries: int, cidrs: int, chunk: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from fastagi import config as configuration
    from fastagi import feeds, store
    from fastagi.addresses import AddressSet
    from fastagi.agent import Agent
    from fastagi.firewall import FirewallSettings, create
    from fastagi.service import make_store

    store.FEED_CHUNK = chunk
    lines = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(entries)]
    lines += [f"172.{16 + (n >> 8 & 15)}.{n & 255}.0/24" for n in range(cidrs)]
    http_server, port = _serve(("# bench list\n" + "\n".join(lines) + "\n").encode())
    config = configuration.load(None, {"FASTAGI_REDIS_URL": redis_url})
    shared = make_store(config, store.redis_client(config.redis, caller_deadlines=True))
    agent_store = make_store(config, store.redis_client(config.redis, caller_deadlines=True))
    firewall = create(FirewallSettings(backend="nftables"))
    calls: list[tuple[str, int, float, float]] = []  # method, bans, started, seconds
    for method in ("set", "add", "delete"):
        original = getattr(firewall, method)

        def timed(bans, _original=original, _method=method):
            began = time.perf_counter()
            _original(bans)
            calls.append((_method, len(bans), began, time.perf_counter() - began))

        setattr(firewall, method, timed)
    agent = Agent(agent_store, firewall, 3600, AddressSet([]), block_ms=100)
    task = asyncio.create_task(agent.run())
    while agent.full_reconciles < 1:
        await asyncio.sleep(0.01)
    spec = feeds.FeedSpec("bench", url=f"http://127.0.0.1:{port}/list.txt", refresh=3600)
    out: dict = {"entries": entries + cidrs, "chunk": chunk}
    for run in ("first", "refresh"):
        calls.clear()
        await shared.feed_release(spec.name)
        began = time.perf_counter()
        parsed = await asyncio.to_thread(feeds.fetch, spec)
        fetched = time.perf_counter()
        done = await feeds.apply(shared, shared.protected, spec, parsed, embedded=False)
        stored = time.perf_counter()
        while not [c for c in calls if c[1] >= entries]:
            await asyncio.sleep(0.005)
        applied = time.perf_counter()
        big = next(c for c in calls if c[1] >= entries)
        out[run] = {
            "fetch_parse_s": round(fetched - began, 3),
            "store_s": round(stored - fetched, 3),
            "placed": done.placed,
            "sync_to_applied_s": round(applied - stored, 3),
            "firewall_call": big[0],
            "firewall_call_s": round(big[3], 3),
            "firewall_calls": [(c[0], c[1]) for c in calls],
            "total_s": round(applied - began, 3),
        }
    kernel = firewall.list()
    out["kernel_elements"] = len(kernel)
    agent.stop()
    await asyncio.gather(task, return_exceptions=True)
    firewall.teardown()
    await shared.close()
    await agent_store.close()
    http_server.shutdown()
    return out


def inner(args: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(json.dumps(asyncio.run(_inner(args.redis, args.entries, args.cidrs, args.chunk))))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--cidrs", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=250, help="targets per store script")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args)
    work = Path(tempfile.mkdtemp(prefix="fastagi-feed-bench-"))
    sock = work / "redis.sock"
    argv = ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(work)]
    redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    name = f"fa{secrets.token_hex(3)}-feedbench"
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        argv = ["ip", "netns", "exec", name, sys.executable, __file__, "--inner"]
        argv += ["--redis", f"unix://{sock}", "--entries", str(args.entries)]
        argv += ["--cidrs", str(args.cidrs), "--chunk", str(args.chunk)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    for run in ("first", "refresh"):
        r = result[run]
        print(
            f"{run:>8}: {result['entries']} entries: fetch+parse {r['fetch_parse_s']:.2f}s, "
            f"store {r['store_s']:.2f}s ({r['placed']} holds), sync event -> applied "
            f"{r['sync_to_applied_s']:.2f}s, of which the one firewall {r['firewall_call']}() "
            f"{r['firewall_call_s']:.2f}s; firewall calls {r['firewall_calls']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
