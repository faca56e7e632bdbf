"""`fastagi-ctl status`: the cluster at a glance, in the `fail2ban-client status` look."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from fastagi.addresses import parse_address
from fastagi.admin import cli_address, client_store, when
from fastagi.config import Config, redacted
from fastagi.store import Store


async def gather_status(store: Store, config: Config) -> dict[str, Any]:
    banned, counted, auth_counted, (totals, bad_totals), agents = await asyncio.gather(
        store.banned(),
        store.counted(),
        store.auth_counted(config.auth.window),
        store.read_totals(),
        store.agents(),
    )
    records = await asyncio.gather(*(store.record(ip) for ip in banned))
    unreadable = [f"stats field {key}: {text!r}" for key, text in sorted(bad_totals.items())]
    unreadable += [
        f"agents entry {pbx}: {info['unreadable']!r}"
        for pbx, info in sorted(agents.items())
        if "unreadable" in info
    ]
    for ip, record in zip(banned, records, strict=True):
        if not _whole(record.get("bans", "1")):
            unreadable.append(f"record of {ip}: bans {record['bans'][:40]!r}")
    return {
        "pbx_id": store.pbx_id,
        "store": {"url": redacted(config.redis.url), "reachable": True},
        "firewall": {"backend": config.firewall.backend, "chain": config.firewall.chain},
        "calls": totals.get("calls", None if "calls" in bad_totals else 0),
        "injections": totals.get("injections", None if "injections" in bad_totals else 0),
        "counted": {
            "current": len(counted),
            "list": [{"ip": ip, "count": n} for ip, n in sorted(counted.items())],
        },
        # password guessing, from Asterisk's AMI security events (auth.py)
        "auth": {
            "enabled": config.auth.enabled,
            "failures": totals.get("auth_failures", None if "auth_failures" in bad_totals else 0),
            "current": len(auth_counted),
            "list": [{"ip": ip, "count": n} for ip, n in sorted(auth_counted.items())],
        },
        "banned": {
            "current": len(banned),
            "total": totals.get("bans", None if "bans" in bad_totals else 0),
            "list": [
                {
                    "ip": ip,
                    "until": until,
                    "pbx_id": record.get("pbx_id", ""),
                    "reason": record.get("reason", ""),
                    "bans": _whole(record.get("bans", "1")),
                }
                for (ip, until), record in zip(banned.items(), records, strict=True)
            ],
        },
        "unbanned_total": totals.get("unbans", None if "unbans" in bad_totals else 0),
        "agents": [
            {
                "pbx_id": pbx,
                "last_heartbeat": info.get("time"),
                "bans_applied": info.get("applied", 0),
                "backend": info.get("backend", ""),
            }
            for pbx, info in sorted(agents.items())
            if "unreadable" not in info
        ],
        # What another writer left in Redis that status could not read (skipped above).
        "unreadable": unreadable,
    }


def _whole(text: str) -> int | None:
    """A count from Redis, or None when it is not one."""
    return int(text) if text.isascii() and text.isdigit() else None


def _shown(value: int | None) -> str:
    return "? (unreadable, see below)" if value is None else str(value)


def render_status(status: dict[str, Any]) -> str:
    """The `fail2ban-client status JAIL` look."""
    now = time.time()
    lines = [
        f"Status for fastagi-screen (pbx {status['pbx_id']})",
        f"|- Store:    {status['store']['url']}",
        f"|- Firewall: {status['firewall']['backend']} (chain {status['firewall']['chain']})",
        "|- Screening",
        f"|  |- Currently counted: {status['counted']['current']}",
        f"|  |- Total calls:       {_shown(status['calls'])}",
        f"|  |- Injection attempts: {_shown(status['injections'])}",
        (
            "|  `- Counted IP list:   "
            + " ".join(f"{c['ip']}({c['count']})" for c in status["counted"]["list"])
        ).rstrip(),
        f"|- Password guessing (AMI, {'on' if status['auth']['enabled'] else 'off here'})",
        f"|  |- Currently counted: {status['auth']['current']}",
        f"|  |- Total failures:    {_shown(status['auth']['failures'])}",
        (
            "|  `- Counted IP list:   "
            + " ".join(f"{c['ip']}({c['count']})" for c in status["auth"]["list"])
        ).rstrip(),
        "|- Actions",
        f"|  |- Currently banned: {status['banned']['current']}",
        f"|  |- Total banned:     {_shown(status['banned']['total'])}",
        "|  `- Banned IP list:",
    ]
    for ban in status["banned"]["list"]:
        lines.append(
            f"|     {ban['ip']} until {when(ban['until'])} "
            f"(by {ban['pbx_id'] or '?'}, {ban['reason']}, ban #{ban['bans'] or '?'})"
        )
    lines.append("`- Agents seen")
    agents = status["agents"]
    for n, agent in enumerate(agents):
        age = now - (agent["last_heartbeat"] or 0)
        mark = "`-" if n == len(agents) - 1 else "|-"
        lines.append(
            f"   {mark} {agent['pbx_id']}: last heartbeat {age:.0f}s ago, "
            f"{agent['bans_applied']} bans applied ({agent['backend']})"
        )
    if not agents:
        lines.append("   `- (none)")
    if status["unreadable"]:
        lines.append("Unreadable in Redis (written by something else; skipped):")
        lines += [f"   {entry}" for entry in status["unreadable"]]
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace, config: Config) -> int:
    address = str(cli_address(args.ip, config, refuse_ignored=False)) if args.ip else ""
    async with client_store(config) as store:
        if address:
            banned = await store.banned()
            record, count = await store.record(address), await store.count(address)
            auth_count = await store.auth_count(address, config.auth.window)
            report: dict[str, Any] = {
                "ip": address,
                "count": count,
                "auth_failures": auth_count,
                "banned": address in banned,
                "until": banned.get(address),
                "ignored": parse_address(address) in config.screening.ignore,
                "history": record,
            }
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print(f"Status for {address}")
                print(f"|- Count in window: {count}")
                print(f"|- Auth failures:   {auth_count} (in the [auth] window)")
                if report["banned"]:
                    print(f"|- Banned until:    {when(report['until'])}")
                else:
                    print("|- Banned:          no")
                print(f"|- Ignored:         {'yes' if report['ignored'] else 'no'}")
                print(
                    f"`- Previous bans:   {record.get('bans', '0')}"
                    + (
                        f" (last by {record['pbx_id']}, {record.get('reason')})"
                        if record.get("pbx_id")
                        else ""
                    )
                )
            return 0
        status = await gather_status(store, config)
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    if status["unreadable"]:
        print(
            f"fastagi-ctl: status: {len(status['unreadable'])} unreadable entries in Redis "
            "(listed at the end)",
            file=sys.stderr,
        )
    return 0
