"""`fastagi-ctl status`: the cluster at a glance, in the `fail2ban-client status` look."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from typing import Any

from fastagi.addresses import parse_target, target_text
from fastagi.admin import cli_target, client_store, holding, printable, protected_set, when
from fastagi.config import Config, redacted
from fastagi.geo import open_db, target_country
from fastagi.protect import Protected
from fastagi.store import Store, heartbeat_age


async def gather_status(store: Store, config: Config) -> dict[str, Any]:
    await store.sync_clock()  # heartbeats carry Redis's time; so must "now"
    banned, counted, auth_counted, (totals, bad_totals), agents = await asyncio.gather(
        store.banned(),
        store.counted(),
        store.auth_counted(config.auth.window),
        store.read_totals(),
        store.agents(),
    )
    protected = store.protected
    records = await asyncio.gather(*(store.record(ip) for ip in banned))
    unreadable = [f"stats field {key}: {text!r}" for key, text in sorted(bad_totals.items())]
    unreadable += [
        f"agents entry {pbx}: {info['unreadable']!r}"
        for pbx, info in sorted(agents.items())
        if "unreadable" in info
    ]
    geo = open_db(config.screening.geoip_db)
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
            "list": [
                _with_country({"ip": ip, "count": n}, target_country(geo, ip))
                for ip, n in sorted(counted.items())
            ],
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
                _with_country(
                    {
                        "ip": ip,
                        "until": until,
                        "pbx_id": record.get("pbx_id", ""),
                        "reason": record.get("reason", ""),
                        "bans": _whole(record.get("bans", "1")),
                        # calls seen from it: those counted up to the ban and those since
                        "calls": _whole(record.get("count", "0")),
                        "protected": _protected(protected, ip),
                    },
                    target_country(geo, ip, record.get("country", "")),
                )
                for (ip, until), record in zip(banned.items(), records, strict=True)
            ],
        },
        "unbanned_total": totals.get("unbans", None if "unbans" in bad_totals else 0),
        "agents": [
            _agent(pbx, info, store.now())
            for pbx, info in sorted(agents.items())
            if "unreadable" not in info
        ],
        # What another writer left in Redis that status could not read (skipped above).
        "unreadable": unreadable,
        "protected": protected.summary() if protected is not None else None,
        # blocklists in (feeds.py): each feed's last refresh
        "feeds": await store.feed_states(),
    }


def _agent(pbx: str, info: dict[str, Any], now: float) -> dict[str, Any]:
    age, stale = heartbeat_age(info, now)
    return {
        "pbx_id": pbx,
        "last_heartbeat": info.get("time"),
        "heartbeat_age": round(age, 1) if math.isfinite(age) else None,
        "stale": stale,
        "bans_applied": info.get("applied", 0),
        "backend": info.get("backend", ""),
    }


def _whole(text: str) -> int | None:
    """A count from Redis, or None when it is not one."""
    return int(text) if text.isascii() and text.isdigit() else None


def _with_country(entry: dict[str, Any], country: str | None) -> dict[str, Any]:
    """A list entry with its country ("" unknown) when there is a database to tell it."""
    if country is not None:
        entry["country"] = country
    return entry


def _in(country: str | None, before: str = " ") -> str:
    """A country for a status line: nothing without a database, `??` when unknown."""
    return "" if country is None else f"{before}{country or '??'}"


def _shown(value: int | None) -> str:
    return "? (unreadable, see below)" if value is None else str(value)


def _protected(protected: Protected | None, ip: str) -> str | None:
    """Why this host never applies a ban-list entry (written by another PBX or by hand)."""
    if protected is None:
        return None
    try:
        return protected.reason(ip)
    except ValueError:  # a malformed entry: agents skip it anyway
        return None


def render_status(status: dict[str, Any]) -> str:
    """The `fail2ban-client status JAIL` look."""
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
            + " ".join(
                f"{c['ip']}({c['count']}{_in(c.get('country'))})" for c in status["counted"]["list"]
            )
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
        aside = f" [protected here, not applied: {ban['protected']}]" if ban["protected"] else ""
        lines.append(
            f"|     {ban['ip']} until {when(ban['until'])} "
            f"(by {ban['pbx_id'] or '?'}, {ban['reason']}, ban #{ban['bans'] or '?'}"
            f"{_in(ban.get('country'), ', country ')}){aside}"
        )
    if status.get("protected"):
        summary = status["protected"]
        lines.append(f"|- Protected (never banned here): {summary['size']}")
        parts = summary["parts"]
        for n, part in enumerate(parts):
            mark = "`-" if n == len(parts) - 1 else "|-"
            entries = " ".join(part["entries"][:8]) + (" ..." if part["size"] > 8 else "")
            lines.append(f"|  {mark} {part['source']}: {part['size']} {entries}".rstrip())
    feeds = status.get("feeds") or {}
    if feeds:
        lines.append(f"|- Blocklists: {len(feeds)}")
    for n, (name, state) in enumerate(sorted(feeds.items())):
        mark = "`-" if n == len(feeds) - 1 else "|-"
        until = state.get("until")
        held = f"held until {when(until)}" if isinstance(until, int | float) else "nothing held"
        error = f"; last refresh failed: {state['error']}" if state.get("error") else ""
        lines.append(f"|  {mark} {name}: {state.get('entries', 0)} entries, {held}{error}")
    lines.append("`- Agents seen")
    agents = status["agents"]
    for n, agent in enumerate(agents):
        age = agent["heartbeat_age"]
        mark = "`-" if n == len(agents) - 1 else "|-"
        lines.append(
            f"   {mark} {agent['pbx_id']}: last heartbeat "
            + ("never" if age is None else f"{age:.0f}s ago")
            + f", {agent['bans_applied']} bans applied ({agent['backend']})"
            + (" STALE: agent dead or stuck, its firewall lags" if agent["stale"] else "")
        )
    if not agents:
        lines.append("   `- (none)")
    if status["unreadable"]:
        lines.append("Unreadable in Redis (written by something else; skipped):")
        lines += [f"   {entry}" for entry in status["unreadable"]]
    return _for_terminal(lines)


def render_address(report: dict[str, Any]) -> str:
    """`status IP`: its count, its ban with the holds that make it, its history."""
    record = report["history"]
    shown, counted = report["given"], report["ip"]
    counted_as = "" if shown == counted else f" (counted as {counted})"
    lines = [f"Status for {shown}{counted_as}", f"|- Count in window: {report['count']}"]
    lines.append(f"|- Auth failures:   {report['auth_failures']} (in the [auth] window)")
    if report["banned"]:
        also = "" if report["banned_as"] == counted else f" (as {report['banned_as']})"
        lines += [
            f"|- Banned until:    {when(report['until'])}{also}",
            "|- Holds (the longest wins)",
        ]
        holds = report["holds"]
        for n, hold in enumerate(holds):
            mark = "`-" if n == len(holds) - 1 else "|-"
            until = when(hold["until"])
            lines.append(f"|  {mark} {hold['source']} until {until} ({hold['reason']})")
    else:
        lines.append("|- Banned:          no")
    lines.append(f"|- Ignored:         {'yes' if report['ignored'] else 'no'}")
    lines.append(f"|- Protected:       {report['protected'] or 'no'}")
    if report.get("country") is not None:
        lines.append(f"|- Country:         {report['country'] or 'unknown'}")
    last = f" (last by {record['pbx_id']}, {record.get('reason')})" if record.get("pbx_id") else ""
    lines.append(f"`- Previous bans:   {record.get('bans', '0')}{last}")
    return _for_terminal(lines)


def _for_terminal(lines: list[str]) -> str:
    """Lines for a terminal: any text in them came from Redis, where any host (or an
    older version) may have written control characters; they show as escapes."""
    return "\n".join(printable(line) for line in lines)


async def cmd_status(args: argparse.Namespace, config: Config) -> int:
    target = cli_target(args.ip, config, refuse_ignored=False) if args.ip else None
    async with client_store(config) as store:
        protected = await protected_set(config, store)
        if target is not None:
            address = target_text(target)
            banned = await store.banned()
            # banned as its prefix, or by another ban that holds it
            given = parse_target(args.ip)
            held = address if address in banned else next(iter(holding(banned, given)), "")
            record = await store.record(held or address)
            count = await store.count(address)
            holds = await store.holds(held) if held else []
            auth_count = await store.auth_count(address, config.auth.window)
            report: dict[str, Any] = {
                "ip": address,
                "given": target_text(given),
                "count": count,
                "auth_failures": auth_count,
                "banned": bool(held),
                "banned_as": held or None,
                "until": banned.get(held),
                "holds": [
                    {"source": h.source, "until": h.until, "reason": h.reason} for h in holds
                ],
                "ignored": given in config.screening.ignore,
                "protected": protected.reason(given),
                "history": record,
            }
            country = target_country(
                open_db(config.screening.geoip_db), target_text(given), record.get("country", "")
            )
            _with_country(report, country)
            print(json.dumps(report, indent=2) if args.json else render_address(report))
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
