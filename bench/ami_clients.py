"""Which AMI client for the password-guessing watcher: CPU per 10,000 events and what
each makes of the hostile captures.

    python bench/ami_clients.py [--repeat 50]

The AMI emulator (a process of its own) replays the three raw Asterisk 22.10.1
captures (tests/data/ami) `--repeat` times after login. Each client runs in a process
of its own, logs in, takes events until it has them all, and reports its process CPU
(user + system, all threads) from login to the last event, and in how many events it
sees `RemoteAddress` naming 203.0.113.9 (the smuggled address) or not a single value:

- ours: fastagi.ami.Connection + AuthWatcher.handle (strict framing, trusted events,
  the attempt rules, metrics; the store left out: its cost is the same for every
  client); ours-reader: the reader alone (what the two libraries do);
- panoramisk 1.4: `panoramisk.Manager`, an event callback for every event;
- pyst2 0.5.1: `asterisk.manager.Manager` (threads), an event callback for every event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPTURES = [
    ROOT / "tests" / "data" / "ami" / n
    for n in ("ami-raw.bin", "ami-noanon-raw.bin", "ami-extra-raw.bin")
]
SMUGGLED = "203.0.113.9"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def forged(value: object) -> bool:
    """A RemoteAddress that names the smuggled address, or is not one value."""
    return not isinstance(value, str) or "203.0.1" in value


async def ours(port: int, expected: int, handle: bool = True) -> dict:
    from fastagi.addresses import AddressSet
    from fastagi.ami import Connection
    from fastagi.auth import AuthWatcher
    from fastagi.config import load

    watcher = AuthWatcher(load(None, {}).auth, None, None, AddressSet([]))  # type: ignore[arg-type]
    connection = await Connection.open("127.0.0.1", port, 5)
    await connection.login("fastagi", "s3cret", 5)
    start, seen, smuggled = cpu(), 0, 0
    while seen < expected:
        message = await connection.read()
        seen += 1
        if handle:
            watcher.handle(message)
        if not message.problem and "RemoteAddress" in message.fields:
            smuggled += forged(message.fields["RemoteAddress"])
        while not watcher.queue.empty():
            address, _ = watcher.queue.get_nowait()
            assert address != SMUGGLED
    return {"cpu": cpu() - start, "events": seen, "smuggled": smuggled}


async def panoramisk(port: int, expected: int) -> dict:
    from panoramisk import Manager

    done = asyncio.Event()
    counts = {"events": 0, "smuggled": 0}

    def on_event(_manager, message) -> None:
        counts["events"] += 1
        if "RemoteAddress" in message and forged(message["RemoteAddress"]):
            counts["smuggled"] += 1
        if counts["events"] >= expected:
            done.set()

    manager = Manager(
        host="127.0.0.1", port=port, username="fastagi", secret="s3cret", ping_delay=0
    )
    manager.register_event("*", on_event)
    start = cpu()
    await manager.connect()
    await asyncio.wait_for(done.wait(), 120)
    took = cpu() - start
    manager.close()
    return {"cpu": took, **counts}


def pyst2(port: int, expected: int) -> dict:
    import asterisk.manager

    done = threading.Event()
    counts = {"events": 0, "smuggled": 0}

    def on_event(event, _manager) -> None:
        counts["events"] += 1
        if forged(event.headers.get("RemoteAddress")):
            counts["smuggled"] += 1
        if counts["events"] >= expected:
            done.set()

    manager = asterisk.manager.Manager()
    manager.register_event("*", on_event)
    start = cpu()
    manager.connect("127.0.0.1", port)
    manager.login("fastagi", "s3cret")
    done.wait(120)
    took = cpu() - start
    manager.close()
    return {"cpu": took, **counts}


def client(name: str, port: int, expected: int) -> None:
    if name == "pyst2":
        result = pyst2(port, expected)
    elif name == "panoramisk":
        result = asyncio.run(panoramisk(port, expected))
    else:
        result = asyncio.run(ours(port, expected, handle=name == "ours"))
    print(json.dumps(result))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client, args.port, args.expected)
        return
    from fastagi.ami_emulator import captured_events

    per_pass = sum(len(captured_events(p.read_bytes())) for p in CAPTURES)
    expected = per_pass * args.repeat + 1  # and the emulator's SuccessfulAuth of the login
    smuggling_per_pass = sum(
        1 for p in CAPTURES for e in captured_events(p.read_bytes()) if b"203.0.1" in e
    )
    carrying = smuggling_per_pass * args.repeat
    print(f"{expected} events per client; {carrying} of them carry 203.0.113.9")
    print(
        "| client | CPU s | CPU us/event | CPU s per 10k events "
        "| events taking RemoteAddress 203.0.113.9 (or a list) |"
    )
    print("|---|---|---|---|---|")
    for name in ("ours", "ours-reader", "panoramisk", "pyst2"):
        port = free_port()
        argv = [sys.executable, "-m", "fastagi.ami_emulator", "--listen", f"127.0.0.1:{port}"]
        for _ in range(args.repeat):
            for path in CAPTURES:
                argv += ["--capture", str(path)]
        emulator = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert emulator.stdout is not None
            emulator.stdout.readline()
            time.sleep(0.2)
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--client",
                    name,
                    "--port",
                    str(port),
                    "--expected",
                    str(expected),
                ],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=ROOT,
            )
        finally:
            emulator.terminate()
            emulator.wait(10)
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        per_event = result["cpu"] / max(1, result["events"])
        print(
            f"| {name} | {result['cpu']:.3f} | {per_event * 1e6:.1f} | {per_event * 1e4:.3f} | "
            f"{result['smuggled']} |"
        )


if __name__ == "__main__":
    main()
