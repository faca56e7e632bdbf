"""The ban list out: the cluster's current bans for other tools, read-only.

Three shapes of the same list: plain text (one target per line, as the store holds it:
`203.0.113.9`, `2001:db8:1:2::/64`), JSON (each ban with what `status --json` shows of
it, plus its start and holds) and CrowdSec decisions (`cscli decisions import`).
Served at /banlist.txt, /banlist.json and /banlist.crowdsec.json on the metrics
listener, and printed by `fastagi-ctl export`.

A consumer that syncs to this list unbans whatever is missing from it, so a list that
cannot be read whole is never served in part: the store away, a list longer than
`export.max_entries` or a read past BUDGET give a 503 (the CLI: exit 1), not a short 200.
Entries this host would never apply (protected, or not an address: another writer's
garbage) are left out; nothing here carries a secret (no Redis URL, no key).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from fastagi.addresses import IPAddress, IPNetwork, parse_target, target_text
from fastagi.config import Config
from fastagi.metrics import Page, PageError
from fastagi.protect import Protected
from fastagi.store import Hold, Store, StoreError

BUDGET = 30.0  # seconds one read of the list may take (100,000 bans in JSON: 3 s of CPU)
SLICE = 2000  # entries handled between two yields of the loop (it answers Asterisk)
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
FORMATS = ("txt", "json", "crowdsec")
PATHS = {"/banlist.txt": "txt", "/banlist.json": "json", "/banlist.crowdsec.json": "crowdsec"}


class ExportError(Exception):
    """The list cannot be given whole now; the message says why."""


@dataclass(frozen=True)
class BanList:
    """The running bans as read at `now` (Redis's clock), target -> end, by target text."""

    now: float
    bans: list[tuple[str, float]]
    left_out: int  # protected or malformed entries not exported


def _exportable(target: str, protected: Protected | None) -> bool:
    """A target in its canonical text (what a consumer's firewall takes) that this host
    may ban. A bare address is parsed by the C library (inet_pton), not by `ipaddress`'s
    Python parser: 100,000 of them cost ~0.2 s instead of ~1 s, and a list is mostly
    addresses."""
    parsed: IPAddress | IPNetwork
    try:
        if "/" in target:
            parsed = parse_target(target)
            canonical = target_text(parsed)
        elif ":" in target:
            parsed = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, target))
            canonical = str(parsed)
        else:
            packed = socket.inet_pton(socket.AF_INET, target)
            parsed, canonical = (
                ipaddress.IPv4Address(packed),
                socket.inet_ntop(socket.AF_INET, packed),
            )
    except (ValueError, OSError):  # AddressError is a ValueError
        return False
    return canonical == target and (protected is None or protected.reason(parsed) is None)


async def read_list(store: Store, max_entries: int) -> BanList:
    """The ban list, whole, without protected or malformed entries."""
    try:
        await store.sync_clock()  # ends are Redis's time; "now" must be too
        banned = await store.banned()
    except StoreError as error:
        raise ExportError(str(error)) from None
    if len(banned) > max_entries:
        raise ExportError(
            f"the ban list holds {len(banned):,} bans, more than export.max_entries "
            f"({max_entries:,}); not served in part"
        )
    bans: list[tuple[str, float]] = []
    entries = list(banned.items())
    for start in range(0, len(entries), SLICE):
        bans += [
            entry
            for entry in entries[start : start + SLICE]
            if _exportable(entry[0], store.protected)
        ]
        await asyncio.sleep(0)
    bans.sort()
    return BanList(store.now(), bans, len(banned) - len(bans))


def render_text(ban_list: BanList) -> bytes:
    """One target per line: ipset/nft scripts, `comm`, `cscli ... --format values`."""
    return "".join(f"{target}\n" for target, _ in ban_list.bans).encode()


async def render_crowdsec(ban_list: BanList) -> bytes:
    """CrowdSec's import format (`cscli decisions import -i FILE.json`): a ban per
    target, scope Ip or Range, for the time it has left (whole seconds, at least 1)."""
    rows = []
    for start in range(0, len(ban_list.bans), SLICE):
        decisions = [
            {
                "duration": f"{max(1, int(until - ban_list.now))}s",
                "reason": "fastagi-screen",
                "scope": "Range" if "/" in target else "Ip",
                "type": "ban",
                "value": target,
            }
            for target, until in ban_list.bans[start : start + SLICE]
        ]
        rows.append(json.dumps(decisions, separators=(",", ":"))[1:-1].encode())
        await asyncio.sleep(0)
    return b"[" + b",".join(rows) + b"]"


def _ban(target: str, until: float, record: dict[str, str], holds: list[Hold]) -> dict[str, Any]:
    """One ban as `status --json` lists it (ip, until, pbx_id, reason, bans), with its
    start and the holds (sources) that keep it."""
    bans = record.get("bans", "1")
    since = record.get("since", "")
    entry: dict[str, Any] = {
        "ip": target,
        "until": until,
        "start": int(since) / 1000.0 if since.isdigit() else None,
        "pbx_id": record.get("pbx_id", ""),
        "reason": record.get("reason", ""),
        "bans": int(bans) if bans.isascii() and bans.isdigit() else None,
        "holds": [{"source": h.source, "until": h.until, "reason": h.reason} for h in holds],
    }
    if "country" in record:  # written by the screening step where a GeoIP database is set
        entry["country"] = record["country"]
    return entry


async def render_json(store: Store, ban_list: BanList) -> bytes:
    """`{"now", "count", "bans": [...]}`, the details read a page at a time, each page
    encoded before the next is read (the loop answers Asterisk between pages)."""
    chunks = [
        b'{"now":%s,"count":%d,"bans":[' % (json.dumps(ban_list.now).encode(), len(ban_list.bans))
    ]
    first = True
    try:
        async for page in store.ban_details(ban_list.bans):
            rows = [_ban(*details) for details in page]
            if rows:
                text = json.dumps(rows, separators=(",", ":"))[1:-1].encode()
                chunks.append(text if first else b"," + text)
                first = False
            await asyncio.sleep(0)
    except StoreError as error:
        raise ExportError(str(error)) from None
    chunks.append(b"]}")
    return b"".join(chunks)


async def render(store: Store, fmt: str, max_entries: int) -> bytes:
    """The list in `fmt` (txt, json, crowdsec), read whole within BUDGET."""
    try:
        async with asyncio.timeout(BUDGET):
            ban_list = await read_list(store, max_entries)
            if fmt == "json":
                return await render_json(store, ban_list)
            if fmt == "crowdsec":
                return await render_crowdsec(ban_list)
    except TimeoutError:
        raise ExportError(f"reading the ban list took more than {BUDGET:g}s") from None
    return render_text(ban_list)


class Exporter:
    """The pages of the metrics listener. A body is built at most once per `refresh`
    seconds per format, and concurrent requests share one build, so scrapers polling a
    100,000-ban list cost Redis one read per `refresh`, not one each."""

    def __init__(self, store: Store, max_entries: int, refresh: float) -> None:
        self.store = store
        self.max_entries = max_entries
        self.refresh = refresh
        self._built: dict[str, tuple[float, bytes]] = {}  # format -> (monotonic, body)
        self._building: dict[str, asyncio.Future[bytes]] = {}

    async def body(self, fmt: str) -> bytes:
        built = self._built.get(fmt)
        if built is not None and time.monotonic() - built[0] < self.refresh:
            return built[1]
        running = self._building.get(fmt)
        if running is None:
            running = asyncio.ensure_future(render(self.store, fmt, self.max_entries))
            self._building[fmt] = running
            running.add_done_callback(lambda done: self._done(fmt, done))
        try:
            return await asyncio.shield(running)
        except ExportError as error:
            raise PageError(f"ban list unavailable: {error}") from None

    def _done(self, fmt: str, done: asyncio.Future[bytes]) -> None:
        self._building.pop(fmt, None)
        if not done.cancelled() and done.exception() is None:
            self._built[fmt] = (time.monotonic(), done.result())

    def pages(self) -> dict[str, Page]:
        """path -> page, for Metrics.serve(pages=...)."""
        return {path: self._page(fmt) for path, fmt in PATHS.items()}

    def _page(self, fmt: str) -> Page:
        content_type = TEXT if fmt == "txt" else JSON

        async def page() -> tuple[str, bytes]:
            return content_type, await self.body(fmt)

        return page


async def cmd_export(args: argparse.Namespace, config: Config) -> int:
    """`fastagi-ctl export [--format txt|json|crowdsec]`: the list on stdout."""
    from fastagi.admin import client_store, protected_set

    async with client_store(config) as store:
        await protected_set(config, store)
        try:
            body = await render(store, args.format, config.export.max_entries)
        except ExportError as error:
            raise StoreError(f"export: {error}") from None
    sys.stdout.buffer.write(body if args.format == "txt" else body + b"\n")
    sys.stdout.buffer.flush()
    return 0
