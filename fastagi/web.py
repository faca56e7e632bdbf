"""The status page: `fastagi-ctl status` as one HTML page at `/` of the [metrics] listener.

Read-only and self-contained: the same data as `status --json` (status.gather_status),
the bans per hour drawn as server-side SVG, no script, no external resource (a strict
Content-Security-Policy says so to the browser too). Addresses, reasons, hold sources and
PBX ids are written by callers, fail2ban jails or other hosts: every value goes through
`_text`, which makes it printable and HTML-escapes it. Nothing secret is on it: the Redis
URL without its password, never the AGI URL key.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import logging
import time
from collections.abc import Iterable
from typing import Any

from fastagi.admin import printable
from fastagi.config import Config
from fastagi.metrics import Page
from fastagi.status import gather_status
from fastagi.store import Hold, Store, StoreError

log = logging.getLogger("fastagi.web")

PAGE_BUDGET = 5.0  # seconds the store reads of one page view may take
BAN_ROWS = 200  # current bans listed (the latest ends first); `status` lists them all
TOP_OFFENDERS = 10
CHART_HOURS = 24
REFRESH = 30  # seconds between the browser's reloads of the page
BAN_COLUMNS = (
    "Address",
    "Reason",
    "Holds (source until, reason)",
    "Banned by",
    "Ends",
    "Left",
    "Ban #",
)

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.sub{color:#666}.tiles{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.tile{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5em .9em;min-width:8em}
.tile b{display:block;font-size:1.6em}.warn{color:#b00020}
.cols{display:flex;flex-wrap:wrap;gap:2em}.cols>div{flex:1 1 28em}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee}td.n{text-align:right}code{font-size:.95em}
ul.tree,ul.tree ul{list-style:none;padding-left:1.2em;margin:0}
ul.tree li{border-left:1px solid #bbb;padding-left:.5em}
svg text{font:11px system-ui,sans-serif;fill:#444}
"""


def _text(value: Any) -> str:
    """A value for the page: printable (control characters as escapes), HTML-escaped;
    None (a count status could not read, listed under "Unreadable") as "?"."""
    return html.escape(printable("?" if value is None else str(value)), quote=True)


def _utc(unix: float | None) -> str:
    if unix is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def _span(seconds: float) -> str:
    """A duration the way an admin reads it: 45s, 12m, 3h 5m, 2d 4h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _table(table_id: str, head: Iterable[str], rows: list[list[str]], empty: str) -> str:
    """A table whose cells are already markup (each value passed through _text)."""
    heading = "".join(f"<th>{h}</th>" for h in head)
    if not rows:
        return f'<p id="{table_id}" class="sub">{empty}</p>'
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f'<table id="{table_id}"><thead><tr>{heading}</tr></thead><tbody>{body}</tbody></table>'


def _td(value: Any, number: bool = False) -> str:
    return f'<td class="n">{_text(value)}</td>' if number else f"<td>{_text(value)}</td>"


def chart(hours: list[tuple[float, int]]) -> str:
    """Bans per hour as an SVG bar chart (server-drawn: the page needs no script)."""
    width, height, left, bottom, top = 760, 190, 36, 22, 14
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max([count for _, count in hours] + [1])
    step = plot_w / max(len(hours), 1)
    parts = [
        f'<svg id="bans-per-hour" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" role="img" aria-label="Bans per hour, last {len(hours)} hours">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" '
        'stroke="#888"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for n, (start, count) in enumerate(hours):
        x = left + n * step
        bar = plot_h * count / peak
        label = time.strftime("%H:00", time.gmtime(start))
        parts.append(
            f'<rect x="{x + 2:.1f}" y="{top + plot_h - bar:.1f}" width="{step - 4:.1f}" '
            f'height="{bar:.1f}" fill="#c0392b"><title>{label} UTC: {count} bans</title></rect>'
        )
        if count:
            parts.append(
                f'<text x="{x + step / 2:.1f}" y="{top + plot_h - bar - 3:.1f}" '
                f'text-anchor="middle">{count}</text>'
            )
        if (len(hours) - 1 - n) % 3 == 0:  # every third hour, this one included
            parts.append(
                f'<text x="{x + step / 2:.1f}" y="{height - 6}" text-anchor="middle">{label}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _tree(status: dict[str, Any]) -> str:
    """The `status` tree, as nested lists."""
    banned, auth = status["banned"], status["auth"]

    def items(pairs: Iterable[tuple[str, Any]]) -> str:
        return "".join(f"<li>{label}: <b>{_text(value)}</b></li>" for label, value in pairs)

    counted = " ".join(f"{c['ip']}({c['count']})" for c in status["counted"]["list"][:20])
    auth_listed = " ".join(f"{c['ip']}({c['count']})" for c in auth["list"][:20])
    agents = "".join(
        f"<li>{_text(a['pbx_id'])}: last heartbeat "
        + ("never" if a["heartbeat_age"] is None else f"{_text(a['heartbeat_age'])}s ago")
        + f", {_text(a['bans_applied'])} bans applied ({_text(a['backend'])})"
        + (' <b class="warn">STALE</b>' if a["stale"] else "")
        + "</li>"
        for a in status["agents"]
    )
    protected = ""
    if status.get("protected"):
        parts = "".join(
            f"<li>{_text(part['source'])}: {_text(part['size'])}</li>"
            for part in status["protected"]["parts"]
        )
        protected = (
            f"<li>Protected (never banned here): <b>{_text(status['protected']['size'])}</b>"
            f"<ul>{parts}</ul></li>"
        )
    return (
        f'<ul class="tree" id="status-tree"><li>Status for fastagi-screen '
        f"(pbx <b>{_text(status['pbx_id'])}</b>)<ul>"
        + items(
            [
                ("Store", status["store"]["url"]),
                (
                    "Firewall",
                    f"{status['firewall']['backend']} (chain {status['firewall']['chain']})",
                ),
            ]
        )
        + "<li>Screening<ul>"
        + items(
            [
                ("Currently counted", status["counted"]["current"]),
                ("Total calls", status["calls"]),
                ("Injection attempts", status["injections"]),
                ("Counted IP list", counted or "-"),
            ]
        )
        + "</ul></li>"
        + f"<li>Password guessing (AMI, {'on' if auth['enabled'] else 'off here'})<ul>"
        + items(
            [
                ("Currently counted", auth["current"]),
                ("Total failures", auth["failures"]),
                ("Counted IP list", auth_listed or "-"),
            ]
        )
        + "</ul></li><li>Actions<ul>"
        + items(
            [
                ("Currently banned", banned["current"]),
                ("Total banned", banned["total"]),
                ("Total unbanned", status["unbanned_total"]),
            ]
        )
        + "</ul></li>"
        + protected
        + f"<li>Agents seen<ul>{agents or '<li>(none)</li>'}</ul></li>"
        + "</ul></li></ul>"
    )


def _offenders(status: dict[str, Any]) -> list[list[str]]:
    """The addresses that came back most: previous bans, then calls seen, banned or not."""
    rows: dict[str, tuple[int, int, str]] = {}
    for ban in status["banned"]["list"]:
        rows[ban["ip"]] = (ban["bans"] or 0, ban.get("calls") or 0, "banned")
    for entry in status["counted"]["list"]:
        rows.setdefault(entry["ip"], (0, entry["count"], "counted"))
    top = sorted(rows.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return [
        [_td(ip), _td(bans, True), _td(calls, True), _td(state)]
        for ip, (bans, calls, state) in top[:TOP_OFFENDERS]
    ]


def _ban_rows(bans: list[dict[str, Any]], holds: list[list[Hold]], now: float) -> list[list[str]]:
    rows = []
    for ban, held in zip(bans, holds, strict=True):
        sources = "; ".join(
            f"{hold.source} until {_utc(hold.until)} ({hold.reason})" for hold in held
        )
        aside = f" [protected here, not applied: {ban['protected']}]" if ban["protected"] else ""
        rows.append(
            [
                f"<td><code>{_text(ban['ip'])}</code></td>",
                _td(ban["reason"]),
                _td((sources or "-") + aside),
                _td(ban["pbx_id"] or "?"),
                _td(_utc(ban["until"])),
                _td(_span(ban["until"] - now), True),
                _td(ban["bans"] or "?", True),
            ]
        )
    return rows


def _agent_rows(agents: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for agent in agents:
        age = agent["heartbeat_age"]
        state = "STALE: dead or stuck, its firewall lags" if agent["stale"] else "ok"
        rows.append(
            [
                _td(agent["pbx_id"]),
                _td(agent["backend"]),
                _td(_utc(agent["last_heartbeat"])),
                _td("never" if age is None else f"{_span(age)} ago", True),
                _td(agent["bans_applied"], True),
                f'<td class="{"warn" if agent["stale"] else ""}">{_text(state)}</td>',
            ]
        )
    return rows


def render_page(
    status: dict[str, Any],
    hours: list[tuple[float, int]],
    holds: list[list[Hold]],
    now: float,
) -> str:
    """The whole page; `holds` are those of the first len(holds) bans of the list."""
    bans = status["banned"]["list"][: len(holds)]
    stale = sum(1 for agent in status["agents"] if agent["stale"])
    tiles = [
        ("Currently banned", status["banned"]["current"], ""),
        ("Total banned", status["banned"]["total"], ""),
        ("Total calls", status["calls"], ""),
        ("Injection attempts", status["injections"], "warn" if status["injections"] else ""),
        ("Counted now", status["counted"]["current"], ""),
        ("Agents (stale)", f"{len(status['agents'])} ({stale})", "warn" if stale else ""),
    ]
    tile_html = "".join(
        f'<div class="tile {cls}">{label}<b>{_text(value)}</b></div>' for label, value, cls in tiles
    )
    more = len(status["banned"]["list"]) - len(bans)
    unreadable = "".join(f"<li>{_text(entry)}</li>" for entry in status["unreadable"])
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        f"<title>fastagi-screen: {_text(status['pbx_id'])}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>fastagi-screen on {_text(status['pbx_id'])}</h1>"
        f'<div class="sub">{_text(_utc(now))}, read-only; reloads every {REFRESH}s. '
        'Raw numbers: <a href="metrics">/metrics</a>.</div>'
        f'<div class="tiles">{tile_html}</div>'
        f"<h2>Bans per hour (last {len(hours)} h, UTC)</h2>{chart(hours)}"
        '<div class="cols"><div><h2>Status</h2>'
        f"{_tree(status)}</div><div><h2>Top offenders</h2>"
        + _table(
            "offenders",
            ["Address", "Bans", "Calls", "Now"],
            _offenders(status),
            "Nobody counted or banned.",
        )
        + "<h2>Injection attempts</h2>"
        '<p id="injections">Sessions with a forged AGI environment or stray lines (a '
        "caller ID or dialed number with line feeds), cluster-wide: "
        f"<b>{_text(status['injections'])}</b>.</p></div></div>"
        f"<h2>Current bans ({_text(status['banned']['current'])})</h2>"
        + _table(
            "bans",
            BAN_COLUMNS,
            _ban_rows(bans, holds, now),
            "No ban running.",
        )
        + (
            f'<p class="sub">{more} more, ending sooner: <code>fastagi-ctl status</code> '
            "lists them all.</p>"
            if more > 0
            else ""
        )
        + "<h2>Agents</h2>"
        + _table(
            "agents",
            ["PBX", "Backend", "Last heartbeat", "Age", "Bans applied", "State"],
            _agent_rows(status["agents"]),
            "No agent has reported yet.",
        )
        + (
            f'<h2 class="warn">Unreadable in Redis (skipped)</h2><ul>{unreadable}</ul>'
            if unreadable
            else ""
        )
        + "</body></html>"
    )


def _error_page(error: str) -> str:
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH}"><title>fastagi-screen</title></head>'
        f'<body><h1>fastagi-screen</h1><p id="error">The store did not answer: {_text(error)}'
        "</p></body></html>"
    )


def pages(store: Store, config: Config) -> dict[str, Page]:
    """`/` of the [metrics] listener: the status page, unless `metrics.status_page` keeps
    it off there ("loopback", the default: on a loopback listener only)."""
    mode = config.metrics.status_page
    host = config.metrics.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
    if mode == "on" or (mode == "loopback" and _loopback(host)):
        return {"/": status_page(store, config)}
    why = (
        "metrics.status_page is off"
        if mode == "off"
        else f'[metrics] listen {host} is not a loopback address (metrics.status_page = "on" '
        "serves it there anyway: put a reverse proxy with authentication in front)"
    )
    log.info("status page not served: %s", why)
    body = f"The status page is not served on this listener: {why}.\nMetrics: /metrics\n"

    async def off() -> tuple[str, bytes]:
        return "text/plain; charset=utf-8", body.encode()

    return {"/": off}


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: where it points may change
        return False


def status_page(store: Store, config: Config) -> Page:
    """The page at `/`: read at each view, bounded by PAGE_BUDGET; a store that does not
    answer gives a page saying so (and one log line), never a dead connection."""

    async def page() -> tuple[str, bytes]:
        try:
            async with asyncio.timeout(PAGE_BUDGET):
                status = await gather_status(store, config)
                status["banned"]["list"].sort(key=lambda ban: (-ban["until"], ban["ip"]))
                shown = status["banned"]["list"][:BAN_ROWS]
                hours, *holds = await asyncio.gather(
                    store.bans_by_hour(CHART_HOURS), *(store.holds(ban["ip"]) for ban in shown)
                )
            body = render_page(status, hours, holds, store.now())
        except (StoreError, TimeoutError) as error:
            text = str(error) or "no answer within the page's budget"
            log.info("status page: %s", text)
            body = _error_page(text)
        return "text/html; charset=utf-8", body.encode()

    return page
