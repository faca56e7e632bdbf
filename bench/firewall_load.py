"""How fast each firewall backend loads a large ban list, in a namespace of its own.

    python bench/firewall_load.py --bans 100000 [--backends nftables,ipset,iptables]

Per backend: set() of N bans (the agent's reconcile at start), set() again (a reconcile
that replaces everything), then add() and delete() of one ban with N in place, and
list(). The iptables backend (one rule per address, libiptc copies the whole table on
each commit) is capped at --iptables-max bans (default 5,000) and says so.

Runs only inside network namespaces it creates and removes (needs root); the host's own
firewall is never touched. Times are measured in the backend's process, around the call.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import subprocess
import sys
import time

BACKENDS = ("nftables", "ipset", "iptables")


def inner(backend: str, count: int) -> dict:
    from fastagi.firewall import FirewallSettings, create

    fw = create(FirewallSettings(backend=backend))
    fw.setup()
    now = time.time()
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    bans = {ipaddress.IPv4Network(base + i): now + 3600 for i in range(count)}
    one = ipaddress.ip_network("198.51.100.7")
    out: dict[str, float | int | str] = {"backend": backend, "bans": count}

    started = time.perf_counter()
    fw.set(bans)
    out["set"] = time.perf_counter() - started
    started = time.perf_counter()
    fw.set(bans)
    out["set_again"] = time.perf_counter() - started
    started = time.perf_counter()
    fw.add({one: now + 600})
    out["add_one"] = time.perf_counter() - started
    started = time.perf_counter()
    fw.delete([one])
    out["delete_one"] = time.perf_counter() - started
    started = time.perf_counter()
    listed = fw.list()
    out["list"] = time.perf_counter() - started
    out["listed"] = len(listed)
    fw.teardown()
    return out


def run_in_namespace(backend: str, count: int) -> dict:
    name = f"fa{secrets.token_hex(3)}-bench"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                __file__,
                "--inner",
                backend,
                "--bans",
                str(count),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if proc.returncode != 0:
            return {
                "backend": backend,
                "bans": count,
                "error": (proc.stderr.strip().splitlines() or ["failed"])[-1],
            }
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bans", type=int, default=100_000)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--iptables-max",
        type=int,
        default=5_000,
        help="cap for the one-rule-per-address iptables backend",
    )
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(inner(args.inner, args.bans)))
        return 0

    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        count = min(args.bans, args.iptables_max) if backend == "iptables" else args.bans
        rows.append(run_in_namespace(backend, count))

    print(
        f"{'backend':<10} {'bans':>8} {'set()':>8} {'set again':>10} {'add 1':>8} "
        f"{'delete 1':>9} {'list()':>8}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:<10} {row['bans']:>8}  error: {row['error']}")
            continue
        ms = {k: row[k] * 1000 for k in ("add_one", "delete_one")}
        print(
            f"{row['backend']:<10} {row['bans']:>8} {row['set']:>7.2f}s {row['set_again']:>9.2f}s"
            f" {ms['add_one']:>6.1f}ms {ms['delete_one']:>7.1f}ms {row['list']:>7.2f}s"
        )
    capped = [r for r in rows if r["backend"] == "iptables" and r["bans"] < args.bans]
    if capped:
        print(
            f"iptables measured at {capped[0]['bans']} bans, not {args.bans}: one rule per "
            "address, libiptc rewrites the table per commit; use ipset or nftables at scale."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
