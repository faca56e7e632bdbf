"""The short commands an admin runs against a running cluster: ban, unban, check,
simulate. They reach the store as a client (Redis, or the embedded service's socket)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from fastagi.access import url_with_key
from fastagi.addresses import (
    WIDEST,
    AddressError,
    IPNetwork,
    overlaps,
    parse_address,
    parse_target,
    target_text,
)
from fastagi.config import Config, parse_duration, redacted
from fastagi.embedded import EmbeddedError, UnsafeRuntimeDir, client_socket
from fastagi.protect import Protected
from fastagi.service import MIN_REDIS_TEXT, make_store, persistence_problem, too_old
from fastagi.store import (
    ADMIN_HOLD,
    AUTH_HOLD,
    MIN_REDIS,
    Store,
    StoreError,
    redis_client,
    version_tuple,
)

HOLD_NAME_MAX = 128
REASON_MAX = 64


class UsageError(Exception):
    """Bad input on the command line: exit 2, nothing changed."""


@contextlib.asynccontextmanager
async def client_store(config: Config, timeout: float | None = None):
    """The store as seen by ban/unban/status: Redis, or a running embedded service.
    `timeout`: seconds per command instead of `redis.timeout` (a big import's)."""
    if config.redis.url.startswith("memory://"):
        try:
            path = client_socket(config.runtime_dir())
        except UnsafeRuntimeDir:
            raise
        except EmbeddedError as error:
            raise StoreError(
                f"{error} (memory://): start `fastagi-ctl serve` first, or set [redis] url"
            ) from None
        import redis.asyncio as aioredis

        client = aioredis.Redis(unix_socket_path=str(path), socket_timeout=timeout or 2)
    else:
        redis = replace(config.redis, timeout=timeout) if timeout else config.redis
        client = redis_client(redis)
    store = make_store(config, client)
    try:
        yield store
    finally:
        await store.close()


def cli_target(text: str, config: Config, refuse_ignored: bool) -> IPNetwork:
    """The ban target an admin means: an address maps to the prefix the screening
    counts it under (`ipv6_prefix`), a CIDR is taken as given, widened to that prefix."""
    try:
        network = parse_target(text)
    except AddressError as error:
        raise UsageError(str(error)) from None
    screening = config.screening
    if network.prefixlen == network.max_prefixlen:
        address = network.network_address
        if refuse_ignored and address in screening.ignore:
            raise UsageError(f"{address} is in screening.ignore: refusing to ban it")
        return screening.prefixes().target(address, screening.ignore)
    if network.prefixlen < WIDEST[network.version]:
        raise UsageError(f"{network}: wider than /{WIDEST[network.version]}, refusing it")
    network = screening.prefixes().widen(network)
    if refuse_ignored and network in screening.ignore:
        raise UsageError(f"{network} overlaps screening.ignore: refusing to ban it")
    return network


def holding(banned: dict[str, float], given: IPNetwork) -> list[str]:
    """The ban list entries that hold any of `given`: for an address, every ban covering
    it (its prefix, a wider escalated /48, its own /128 from before prefixes or from a
    PBX with another ipv6_prefix); for a network, also the bans inside it."""
    out = []
    for text in banned:
        try:
            network = parse_target(text)
        except AddressError:
            continue
        if overlaps(network, given):
            out.append(text)
    return out


def hold_name(text: str | None, default: str | None) -> str | None:
    """The --hold argument checked, or `default`. A hold's name (a ban's source) is shown
    by `status` and built by fail2ban's action from any jail name (`f2b-<jail>`): one
    printable word, whatever its characters."""
    if text is None:
        return default
    if not 0 < len(text) <= HOLD_NAME_MAX or not text.isprintable() or any(map(str.isspace, text)):
        raise UsageError(
            f"--hold: {text[:80]!r} is not a hold name (one printable word, up to "
            f"{HOLD_NAME_MAX} characters)"
        )
    return text


def printable(text: str) -> str:
    """`text` with every unprintable character (newline, escape, U+2028, ...) as its
    escape, so a reason or a name can neither forge a line nor drive the terminal;
    printable non-ASCII text stays as it is."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def render_protected(summary: dict[str, Any]) -> tuple[bool, list[str]]:
    """The protected set in a few lines: its size, then each part and where it comes
    from; not ok when a part could not be read (the set then lacks those addresses)."""
    ok = all(part["ok"] for part in summary["parts"])
    mark = "ok  " if ok else "FAIL"
    lines = [f"{mark} protected: {summary['size']} addresses and networks never banned here"]
    for part in summary["parts"]:
        shown = " ".join(part["entries"][:8]) + (" ..." if len(part["entries"]) > 8 else "")
        detail = f" [{part['detail']}]" if part["detail"] else ""
        lines.append(f"       {part['source']}: {part['size']}{detail} {shown}".rstrip())
    return ok, lines


def when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


async def protected_set(config: Config, store: Store | None = None) -> Protected:
    """This host's protected set as the service sees it: names resolved and, given the
    store, the nodes behind a Sentinel or a Cluster (the store's guard uses the same)."""
    protected = store.protected if store is not None else None
    protected = protected or Protected.from_config(config)
    if store is not None:
        protected.discover = store.nodes
    await protected.refresh()
    return protected


async def cmd_ban(args: argparse.Namespace, config: Config) -> int:
    network = cli_target(args.ip, config, refuse_ignored=True)
    address = target_text(network)
    duration = None
    if args.duration:
        try:
            duration = parse_duration(args.duration)
        except ValueError as error:
            raise UsageError(f"--for: {error}") from None
    hold = hold_name(args.hold, ADMIN_HOLD)
    async with client_store(config) as store:
        if why := (await protected_set(config, store)).reason(network):
            raise UsageError(f"{address} is protected ({why}): refusing to ban it")
        reason = printable(args.reason)[:REASON_MAX]
        placed = await store.hold(address, hold, reason, duration=duration)
    if placed.hold_until >= placed.until:
        print(f"{address} banned until {when(placed.until)} (hold {hold})")
    else:
        print(
            f"{address} banned until {when(placed.until)}; its hold {hold} ends "
            f"{when(placed.hold_until)}, a longer hold keeps the ban"
        )
    return 0


async def cmd_unban(args: argparse.Namespace, config: Config) -> int:
    if args.all == bool(args.ips):
        raise UsageError("give one or more IPs, or --all")
    hold = hold_name(args.hold, None)
    addresses = [target_text(cli_target(ip, config, refuse_ignored=False)) for ip in args.ips]
    async with client_store(config) as store:
        if args.ips:  # and every other ban that holds these addresses
            banned = await store.banned()
            for ip in args.ips:
                addresses += holding(banned, parse_target(ip))
            addresses = list(dict.fromkeys(addresses))
        targets = list(await store.banned()) if args.all else addresses
        lifted = await store.lift(targets, hold)
        if hold in (None, AUTH_HOLD):  # a full unban resets every count, auth's too
            await store.auth_reset(targets)
    for ip in addresses:
        result = lifted[ip]
        if hold is None:
            print(f"{ip} unbanned" if result.ended else f"{ip} was not banned (count reset)")
        elif not result.held:
            print(f"{ip} had no hold {hold}: nothing changed")
        elif result.ended:
            print(f"{ip} unbanned (its last hold, {hold}, lifted)")
        else:
            until = when(result.until)
            print(f"{ip}: hold {hold} lifted; other holds keep it banned until {until}")
    if args.all:
        ended = sum(1 for result in lifted.values() if result.ended)
        if hold is None:
            print(f"{ended} bans lifted")
        else:
            held = sum(1 for result in lifted.values() if result.held)
            print(f"hold {hold} lifted on {held} addresses, {ended} bans ended")
    return 0


async def cmd_check(args: argparse.Namespace, config: Config) -> int:
    from fastagi.firewall import create
    from fastagi.firewall.base import FirewallError

    ok = True
    print(f"ok   config: {config.source}")
    try:
        async with client_store(config) as store:
            await store.ping()
            print(f"ok   store: {redacted(config.redis.url)} answers")
            if config.redis.url.startswith("memory://"):
                _check_embedded_state(await store.embedded_state())
            else:
                ok = await _check_shared_redis(store) and ok
            protected = await protected_set(config, store)
            if config.intel.feed:
                _check_feeds(config, await store.feed_states(), store.now())
    except StoreError as error:
        ok = False
        print(f"FAIL store: {too_old(error, redacted(config.redis.url)) or error}")
        protected = await protected_set(config)
    protected_ok, lines = render_protected(protected.summary())
    ok = ok and protected_ok
    print("\n".join(lines))
    try:
        firewall = create(config.firewall.settings())
        results = await asyncio.to_thread(firewall.check)
    except FirewallError as error:
        ok = False
        print(f"FAIL firewall {config.firewall.backend}: {error}")
    else:
        for result in results:
            ok = ok and result.ok
            detail = f" ({result.detail})" if result.detail else ""
            print(
                f"{'ok  ' if result.ok else 'FAIL'} firewall {firewall.name}: {result.what}{detail}"
            )
    if config.screening.geoip_db:
        ok = _check_geoip(config) and ok
    if config.auth.enabled:
        from fastagi.auth import check_ami

        for passed, line in await check_ami(config.auth):
            ok = ok and passed
            print(f"{'ok  ' if passed else 'FAIL'} auth: {line}")
    return 0 if ok else 1


def _check_feeds(config: Config, states: dict[str, dict[str, Any]], now: float) -> None:
    """Each configured feed and its last refresh (a failing one is a warning: its last
    list stays held until its holds end)."""
    for spec in config.intel.feed:
        state = states.get(spec.name, {})
        every = f"{spec.where}, every {spec.refresh:g}s"
        if state.get("error"):
            print(f"warn feeds: {spec.name} ({every}): last refresh failed: {state['error']}")
        elif isinstance(state.get("time"), int | float):
            entries, ago = state.get("entries", 0), now - state["time"]
            print(f"ok   feeds: {spec.name} ({every}): {entries} entries, {ago:.0f}s ago")
        else:
            print(f"ok   feeds: {spec.name} ({every}): not refreshed yet")


def _check_geoip(config: Config) -> bool:
    """The country database opens: else one line, and screening runs without country
    rules (the service says the same at start)."""
    from fastagi.geo import CountryRules, GeoDB, GeoError

    try:
        db = GeoDB(config.screening.geoip_db)
    except GeoError as error:
        print(f"FAIL geoip: {error}: screening runs without country rules")
        return False
    rules = CountryRules.from_config(config.screening)
    parts = [
        f"deny {' '.join(sorted(rules.deny))}" if rules.deny else "",
        f"allow {' '.join(sorted(rules.allow))} (others: threshold {rules.other_threshold})"
        if rules.allow
        else "",
        " ".join(f"{code}={n}" for code, n in sorted(rules.thresholds.items())),
    ]
    shown = "; ".join(part for part in parts if part) or "no country rules"
    print(f"ok   geoip: {db.describe()}: {shown}")
    db.close()
    return True


def _check_embedded_state(state: dict[str, str]) -> None:
    """Where the running service saves its bans, and whether that works (a warning)."""
    path = state.get("path", "?")
    if state.get("error"):
        print(f"warn store: cannot save {path} ({state['error']}): bans will not survive a restart")
    elif state.get("saved_at"):
        ago = time.time() - int(state["saved_at"]) / 1000
        print(f"ok   store: bans saved in {path} ({ago:.0f}s ago)")
    else:
        print(f"ok   store: bans saved in {path} (nothing to save yet)")


async def _check_shared_redis(store: Store) -> bool:
    """The Redis version (FAIL below the minimum) and its persistence (a warning)."""
    facts = await store.redis_facts()
    ok = True
    if facts.version is None:
        print(f"warn store: Redis version unknown ({'; '.join(facts.refused)})")
    elif version_tuple(facts.version) < MIN_REDIS:
        ok = False
        print(f"FAIL store: Redis {facts.version}: needs {MIN_REDIS_TEXT} or later")
    else:
        print(f"ok   store: Redis {facts.version} (needs {MIN_REDIS_TEXT} or later)")
    problem = persistence_problem(facts)
    if problem:
        print(f"warn store: {problem}")
    else:
        fsync = f", appendfsync {facts.appendfsync}" if facts.appendfsync else ""
        print(f"ok   store: persistence: appendonly yes{fsync}")
    return ok


def _check_target(target: str) -> None:
    """agi://HOST[:PORT]/ROUTE, or one line saying why not (urlsplit raises on some)."""
    try:
        parts = urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as error:
        raise UsageError(f"--target: {target!r} is not agi://HOST[:PORT]/ROUTE ({error})") from None
    if parts.scheme != "agi" or not parts.hostname:
        raise UsageError(f"--target: {target!r} is not agi://HOST[:PORT]/ROUTE")


async def cmd_simulate(args: argparse.Namespace, config: Config) -> int:
    from fastagi.emulator import Call, FakeAsterisk

    try:
        address = parse_address(args.ip)
    except AddressError as error:
        raise UsageError(f"--ip: {error}") from None
    host, port = config.server.listen
    target = args.target or f"agi://{f'[{host}]' if ':' in host else host}:{port}/screen"
    _check_target(target)
    if not 1 <= args.calls <= 100_000:
        raise UsageError("--calls: between 1 and 100000")
    target = url_with_key(target, config.server.key)
    emulator = FakeAsterisk(hold_limit=config.server.session_timeout + 5)
    agi_args = str(address) if args.channel_type == "Local" else ""
    for n in range(1, args.calls + 1):
        call = Call.from_uri_user(
            args.exten, source=str(address), channel_type=args.channel_type, agi_args=agi_args
        )
        result = await emulator.call(target, call)
        shown = " ".join(f"{k}={v}" for k, v in sorted(result.variables.items()))
        print(f"call {n}: AGISTATUS={result.agistatus} {shown or '(no variables set)'}")
        for line in result.log:
            print(f"  log: {line}")
    return 0
