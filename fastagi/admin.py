"""The short commands an admin runs against a running cluster: ban, unban, check,
simulate. They reach the store as a client (Redis, or the embedded service's socket)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from urllib.parse import urlsplit

from fastagi.addresses import AddressError, IPAddress, parse_address
from fastagi.config import Config, parse_duration, redacted
from fastagi.embedded import SOCKET_NAME, reachable
from fastagi.service import make_store
from fastagi.store import StoreError, redis_client


class UsageError(Exception):
    """Bad input on the command line: exit 2, nothing changed."""


@contextlib.asynccontextmanager
async def client_store(config: Config):
    """The store as seen by ban/unban/status: Redis, or a running embedded service."""
    if config.redis.url.startswith("memory://"):
        path = config.runtime_dir() / SOCKET_NAME
        if not reachable(path):
            raise StoreError(
                f"no running service with the embedded store (memory://) at {path}: "
                "start `fastagi-ctl serve` first, or set [redis] url"
            )
        import redis.asyncio as aioredis

        client = aioredis.Redis(unix_socket_path=str(path), socket_timeout=2)
    else:
        client = redis_client(config.redis)
    store = make_store(config, client)
    try:
        yield store
    finally:
        await store.close()


def cli_address(text: str, config: Config, refuse_ignored: bool) -> IPAddress:
    try:
        address = parse_address(text)
    except AddressError as error:
        raise UsageError(str(error)) from None
    if refuse_ignored and address in config.screening.ignore:
        raise UsageError(f"{address} is in screening.ignore: refusing to ban it")
    return address


def when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


async def cmd_ban(args: argparse.Namespace, config: Config) -> int:
    address = cli_address(args.ip, config, refuse_ignored=True)
    duration = None
    if args.duration:
        try:
            duration = parse_duration(args.duration)
        except ValueError as error:
            raise UsageError(f"--for: {error}") from None
    async with client_store(config) as store:
        until = await store.ban(str(address), duration, args.reason[:64])
    print(f"{address} banned until {when(until)}")
    return 0


async def cmd_unban(args: argparse.Namespace, config: Config) -> int:
    if args.all == bool(args.ips):
        raise UsageError("give one or more IPs, or --all")
    addresses = [str(cli_address(ip, config, refuse_ignored=False)) for ip in args.ips]
    async with client_store(config) as store:
        lifted = await (store.unban_all() if args.all else store.unban(addresses))
        await store.auth_reset(lifted if args.all else addresses)
    for ip in addresses:
        print(f"{ip} unbanned" if ip in lifted else f"{ip} was not banned (count reset)")
    if args.all:
        print(f"{len(lifted)} bans lifted")
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
    except StoreError as error:
        ok = False
        print(f"FAIL store: {error}")
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
    if config.auth.enabled:
        from fastagi.auth import check_ami

        for passed, line in await check_ami(config.auth):
            ok = ok and passed
            print(f"{'ok  ' if passed else 'FAIL'} auth: {line}")
    return 0 if ok else 1


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
