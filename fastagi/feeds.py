"""Blocklists in: community VoIP blocklists (APIBan, VoIPBL, any list of addresses and
networks) as ban holds in the shared store.

Each entry of a feed becomes a hold with source `feed:<name>` ending one refresh later
(plus the fetch's own time budget), through the store's place_hold like every other
ban: an address the feed drops is released when its hold ends, a feed that fails keeps
its last good list until then, and a longer hold (a threshold ban, an admin's) is never
shortened. Protected targets (protect.py) are refused and counted; networks wider than
the project allows anywhere (addresses.WIDEST) too. Networks go to the firewall's
prefix sets as any prefix ban does. A big list lands as one batch: chunks of one script
each, pipelined, and one `sync` event naming the entries the write changed, which every
agent applies in one firewall transaction (store.feed_holds, agent.py).

`serve` refreshes the `[[intel.feed]]` entries on their schedule in a task of its own:
the fetch and the parsing run in a thread, the store writes in chunks, so the FastAGI
path never waits on a feed. Across a cluster each feed is fetched by one PBX per
refresh (a lock in Redis). `fastagi-ctl import SOURCE` does the same once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastagi.addresses import (
    WIDEST,
    AddressError,
    IPAddress,
    IPNetwork,
    parse_target,
    target_text,
)
from fastagi.store import FEED_HOLD, Store, StoreError

if TYPE_CHECKING:
    from fastagi.config import Config
    from fastagi.protect import Protected

log = logging.getLogger("fastagi.feeds")

FORMATS = ("apiban", "plain")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_BYTES = 64 * 1024 * 1024  # one response or file; a bigger one is refused, not cut
MAX_PAGES = 10_000  # APIBan pages (250 addresses each) followed before giving up
MAX_ENTRIES = 2_000_000
EMBEDDED_CHUNK = 25  # targets per script on the embedded store, which runs on our loop
USER_AGENT = "fastagi-screen (blocklist import)"


class FeedError(Exception):
    """A feed could not be fetched or read; the message says which and why."""


@dataclass(frozen=True)
class FeedSpec:
    """One `[[intel.feed]]` entry (or one `import`): where the list is and how to read it."""

    name: str
    url: str = ""
    file: str = ""
    format: str = ""  # apiban | plain; "": told by the content (a JSON object is APIBan's)
    refresh: float = 3600.0
    timeout: float = 30.0
    hold: float = 0.0  # how long entries are held (import --for); 0: refresh + timeout

    @property
    def source(self) -> str:
        """The hold's source, also its reason: `feed:<name>`."""
        return f"{FEED_HOLD}{self.name}"

    @property
    def where(self) -> str:
        """The feed for log lines: a file's path, a URL without its path (APIBan's key is in
        the path) and query."""
        if self.file:
            return self.file
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}/..."

    @property
    def lasts(self) -> float:
        """How long an entry is held: one refresh, and the next refresh's fetch time."""
        return self.hold or self.refresh + self.timeout


def feed_name(text: Any) -> str:
    if not isinstance(text, str) or not NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a feed name (letters, digits, _ . -, up to 64)")
    return text


def parse_feeds(value: Any) -> tuple[FeedSpec, ...]:
    """`[[intel.feed]]`: a list of tables with name, url or file, format, refresh, timeout."""
    from fastagi.config import parse_duration

    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError("expected [[intel.feed]] tables (name, url or file, format, refresh)")
    feeds: list[FeedSpec] = []
    for item in value:
        label = item.get("name", f"#{len(feeds) + 1}")
        known = {"name", "url", "file", "format", "refresh", "timeout"}
        if unknown := sorted(set(item) - known):
            raise ValueError(
                f"{label}: unknown key {unknown[0]} (known: {', '.join(sorted(known))})"
            )
        try:
            spec = FeedSpec(
                feed_name(item.get("name")),
                _url(item.get("url", "")),
                _text(item.get("file", "")),
                _format(item.get("format", "")),
                parse_duration(item.get("refresh", "1h")),
                parse_duration(item.get("timeout", "30s")),
            )
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        if bool(spec.url) == bool(spec.file):
            raise ValueError(f"{label}: give either url or file")
        if spec.refresh < 1 or spec.timeout > spec.refresh:
            raise ValueError(f"{label}: refresh at least 1s and not shorter than timeout")
        if spec.name in (feed.name for feed in feeds):
            raise ValueError(f"{label}: a second feed of that name")
        feeds.append(spec)
    return tuple(feeds)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value.strip()


def _url(value: Any) -> str:
    url = _text(value)
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"url {url[:40]!r}: http:// or https:// only")
    return url


def _format(value: Any) -> str:
    text = _text(value)
    if text and text not in FORMATS:
        raise ValueError(f"format {text!r}: one of {', '.join(FORMATS)}")
    return text


# -- reading a list --------------------------------------------------------------------


@dataclass
class Parsed:
    """A feed's targets (canonical text -> network) and what was skipped, by why."""

    targets: dict[str, IPAddress | IPNetwork] = field(default_factory=dict)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)  # why -> the first such line

    def skip(self, why: str, text: str) -> None:
        self.skipped[why] += 1
        self.examples.setdefault(why, text[:60].encode("unicode_escape").decode("ascii"))

    def add(self, token: str, line: str) -> None:
        try:
            target = entry_target(token)
        except (AddressError, ValueError):
            self.skip("junk", line)
            return
        if not isinstance(target, IPAddress) and target.prefixlen < WIDEST[target.version]:
            self.skip("too wide", line)
            return
        text = str(target) if isinstance(target, IPAddress) else target_text(target)
        if text in self.targets:
            self.skip("duplicate", line)
            return
        if len(self.targets) >= MAX_ENTRIES:
            self.skip("over the limit", line)
            return
        self.targets[text] = target

    def summary(self) -> str:
        parts = [f"{n} {why}" for why, n in sorted(self.skipped.items())]
        return ", ".join(parts) or "nothing"


def entry_target(token: str) -> IPAddress | IPNetwork:
    """An address or a network from a list; a network with host bits set (common in
    lists) is taken as the network it names. A bare address stays an address: building a
    network costs ~40 us each, seconds for a list of 100,000."""
    if "/" not in token:
        try:  # the common case, ten times faster than ipaddress's own parser
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, token))
        except (OSError, ValueError):  # not dotted IPv4 (a NUL or non-ASCII: ValueError)
            pass
        address = ipaddress.ip_address(token)
        mapped = getattr(address, "ipv4_mapped", None)
        return mapped or address
    try:
        return parse_target(token)
    except AddressError:
        if "/" not in token:
            raise
        loose = ipaddress.ip_network(token.strip(), strict=False)
        return parse_target(target_text(loose))


def read_plain(text: str, parsed: Parsed | None = None) -> Parsed:
    """A text list: one address or CIDR per line, the first word of it; `#` and `;` start
    comments, blank lines are skipped, anything else is junk (counted)."""
    parsed = parsed or Parsed()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            parsed.skipped["blank"] += 1
            continue
        if line[0] in "#;":
            parsed.skipped["comment"] += 1
            continue
        words = re.split(r"[\s,#;]+", line, maxsplit=1)
        parsed.add(words[0], line)
    return parsed


def read_apiban(pages: Iterable[dict[str, Any]]) -> Parsed:
    """APIBan's pages: each a JSON object whose `ipaddress` list holds the addresses."""
    parsed = Parsed()
    for page in pages:
        for entry in page.get("ipaddress") or []:
            if isinstance(entry, str):
                parsed.add(entry.strip(), entry)
            else:
                parsed.skip("junk", repr(entry))
    return parsed


# -- fetching ------------------------------------------------------------------------


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """(HTTP status, body); a 4xx/5xx is returned, not raised (APIBan ends its paging
    with a 400). Network trouble raises FeedError."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _bounded(response.read(MAX_BYTES + 1))
    except urllib.error.HTTPError as error:
        return error.code, error.read(65536) if error.fp else b""
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise FeedError(f"cannot fetch: {reason}") from None


def _bounded(data: bytes) -> bytes:
    if len(data) > MAX_BYTES:
        raise FeedError(f"larger than {MAX_BYTES // 1048576} MiB: refused")
    return data


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8", errors="replace"))
    except ValueError:
        return None


def _apiban_pages(spec: FeedSpec, first: dict[str, Any]) -> list[dict[str, Any]]:
    """Follow APIBan's paging: `<url>/<ID>` gives the next page until the API answers
    400 (its "no new bans") or an ID of "none"."""
    pages, seen = [first], set()
    base = spec.url.rstrip("/")
    page = first
    deadline = time.monotonic() + spec.timeout * 4
    while len(pages) < MAX_PAGES:
        ident = str(page.get("ID", "")).strip()
        if not ident or ident.lower() == "none" or ident in seen:
            return pages
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", ident):
            raise FeedError(f"APIBan ID {ident[:40]!r} is not one")
        if time.monotonic() > deadline:
            raise FeedError(f"APIBan paging took longer than {spec.timeout * 4:.0f}s")
        seen.add(ident)
        status, body = _get(f"{base}/{ident}", spec.timeout)
        if status == 400:
            return pages
        page = _json(body)
        if status != 200 or not isinstance(page, dict):
            raise FeedError(f"APIBan page {len(pages) + 1}: HTTP {status}")
        pages.append(page)
    raise FeedError(f"APIBan: more than {MAX_PAGES} pages")


def fetch(spec: FeedSpec) -> Parsed:
    """Fetch and read one feed (blocking: run it in a thread)."""
    if spec.file:
        try:
            with open(spec.file, "rb") as file:
                body = _bounded(file.read(MAX_BYTES + 1))
        except OSError as error:
            raise FeedError(f"cannot read {spec.file}: {error.strerror or error}") from None
        status = 200
    else:
        status, body = _get(spec.url, spec.timeout)
        if status != 200:
            raise FeedError(f"HTTP {status}")
    fmt = spec.format
    document = _json(body) if fmt != "plain" and body.lstrip()[:1] == b"{" else None
    if fmt == "apiban" or (not fmt and isinstance(document, dict)):
        if not isinstance(document, dict) or "ipaddress" not in document:
            raise FeedError("not APIBan's JSON (an object with an ipaddress list)")
        pages = _apiban_pages(spec, document) if spec.url else [document]
        return read_apiban(pages)
    return read_plain(body.decode("utf-8", errors="replace"))


# -- into the store ----------------------------------------------------------------------


@dataclass
class Applied:
    """What one refresh did."""

    entries: int
    placed: int
    started: int
    until: float
    parsed: Parsed
    seconds: float


async def apply(
    store: Store, protected: Protected | None, spec: FeedSpec, parsed: Parsed, embedded: bool
) -> Applied:
    """Hold every entry until one refresh later; protected ones are refused and counted."""
    started_at = time.monotonic()
    targets = await asyncio.to_thread(_allowed, parsed, protected)  # 100,000 checks: not here
    await store.sync_clock()
    until = store.now() + spec.lasts
    if embedded:  # fakeredis runs each script on this loop: short ones, awaited one by one
        placed, started = await store.feed_holds(
            targets, spec.source, spec.source, until, chunk=EMBEDDED_CHUNK, pipelined=False
        )
    else:
        placed, started = await store.feed_holds(targets, spec.source, spec.source, until)
    return Applied(len(targets), placed, started, until, parsed, time.monotonic() - started_at)


def _allowed(parsed: Parsed, protected: Protected | None) -> list[str]:
    """The targets that are not protected; the others counted as skipped."""
    targets = []
    for text, target in parsed.targets.items():
        if protected is not None and (why := protected.reason(target)):
            parsed.skip("protected", f"{text} ({why})")
        else:
            targets.append(text)
    return targets


def report(spec: FeedSpec, done: Applied) -> str:
    """The one summary line of a refresh."""
    skipped = done.parsed.summary()
    examples = "; ".join(f"{why}: {text!r}" for why, text in done.parsed.examples.items())
    return (
        f"feed {spec.name}: {done.entries} entries held until "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(done.until))} "
        f"({done.started} new bans, {done.placed} holds placed or lengthened) in "
        f"{done.seconds:.2f}s; skipped: {skipped}" + (f" (first: {examples})" if examples else "")
    )


async def record_state(store: Store, spec: FeedSpec, done: Applied, by: str) -> None:
    """The feed's last refresh, for `status` (best effort: a failure here changes nothing)."""
    state = {
        "time": store.now(),
        "entries": done.entries,
        "until": done.until,
        "skipped": dict(done.parsed.skipped),
        "error": "",
        "by": by,
    }
    with contextlib.suppress(StoreError):
        await store.set_feed_state(spec.name, state)


# -- the schedule in `serve` --------------------------------------------------------------


class FeedRunner:
    """Refreshes the configured feeds on their schedules, off the FastAGI path."""

    def __init__(
        self,
        store: Store,
        protected: Protected | None,
        feeds: Iterable[FeedSpec],
        embedded: bool,
        observer: Any = None,
    ) -> None:
        self.store = store
        self.protected = protected
        self.feeds = tuple(feeds)
        self.embedded = embedded
        self.observer = observer  # metrics.Metrics: feed_refreshed(name, entries, skipped)
        self._failing: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(spec), name=f"feed-{spec.name}") for spec in self.feeds
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self, spec: FeedSpec) -> None:
        while True:
            try:
                ok = await self.refresh(spec)
            except Exception as error:  # a bug must not end the feed's schedule in silence
                log.error("feed %s: refresh failed: %s: %s", spec.name, type(error).__name__, error)
                ok = False
            await asyncio.sleep(spec.refresh if ok else min(spec.refresh, 60.0))

    async def refresh(self, spec: FeedSpec) -> bool:
        """One refresh; False when it failed (the last good list stays held)."""
        try:
            if not await self.store.feed_claim(spec.name, spec.refresh):
                log.debug("feed %s: refreshed by another PBX this period", spec.name)
                return True
            parsed = await asyncio.to_thread(fetch, spec)
            done = await apply(self.store, self.protected, spec, parsed, self.embedded)
        except (FeedError, StoreError) as error:
            await self._failed(spec, str(error))
            return False
        if spec.name in self._failing:
            log.info("feed %s: %s answers again", spec.name, spec.where)
            del self._failing[spec.name]
        log.info("%s", report(spec, done))
        if self.observer is not None:
            self.observer.feed_refreshed(spec.name, done.entries, dict(done.parsed.skipped))
        await record_state(self.store, spec, done, self.store.pbx_id)
        return True

    async def _failed(self, spec: FeedSpec, why: str) -> None:
        """One warning per failing spell; the lock is let go so another PBX may try."""
        with contextlib.suppress(StoreError):
            await self.store.feed_release(spec.name)
        if self.observer is not None:
            self.observer.feed_failed(spec.name)
        if spec.name not in self._failing:
            log.warning(
                "feed %s (%s): %s; its last list stays held until its holds end, "
                "retrying every %.0fs",
                spec.name,
                spec.where,
                why,
                min(spec.refresh, 60.0),
            )
        self._failing[spec.name] = why
        with contextlib.suppress(StoreError):
            state = (await self.store.feed_states()).get(spec.name, {})
            state.update({"error": why[:200], "failed_at": self.store.now()})
            await self.store.set_feed_state(spec.name, state)


# -- `fastagi-ctl import` ------------------------------------------------------------------


def import_spec(args: argparse.Namespace, config: Config) -> FeedSpec:
    """The feed an `import` means: a configured one by its --name, or SOURCE as given."""
    from fastagi.admin import UsageError
    from fastagi.config import parse_duration

    source = args.source
    is_url = source.startswith(("http://", "https://"))
    name = args.name or _default_name(source, is_url)
    try:
        feed_name(name)
        fmt = _format(args.format or "")
        lasts = parse_duration(args.duration) if args.duration else None
    except ValueError as error:
        raise UsageError(f"import: {error}") from None
    configured = {spec.name: spec for spec in config.intel.feed}.get(name)
    spec = configured or FeedSpec(name, refresh=86400.0)
    spec = replace(spec, url=source if is_url else "", file="" if is_url else source)
    spec = replace(spec, format=fmt or spec.format)
    if lasts is not None:
        spec = replace(spec, hold=lasts)
    return spec


def _default_name(source: str, is_url: bool) -> str:
    if is_url:
        base = source.partition("://")[2].split("/", 1)[0].split(":")[0]
    else:
        base = Path(source).stem
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base).strip("-.")[:64] or "import"


async def cmd_import(args: argparse.Namespace, config: Config) -> int:
    from fastagi.admin import client_store, protected_set

    spec = import_spec(args, config)
    try:
        parsed = await asyncio.to_thread(fetch, spec)
    except FeedError as error:
        raise StoreError(f"import {spec.name}: {error}") from None
    embedded = config.redis.url.startswith("memory://")
    async with client_store(config, timeout=60.0) as store:
        protected = await protected_set(config, store)
        done = await apply(store, protected, spec, parsed, embedded)
        await record_state(store, spec, done, f"import on {store.pbx_id}")
    print(report(spec, done))
    return 0
