"""`fastagi-ctl`: a thin command line over the library.

Exit codes: 0 done; 1 the operation failed (e.g. Redis unreachable); 2 bad usage or
bad input, with one line on stderr and nothing changed. Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from fastagi import config as configuration
from fastagi import logs
from fastagi.addresses import AddressError, IPAddress, parse_address
from fastagi.agent import Agent
from fastagi.config import Config, ConfigError, parse_duration
from fastagi.embedded import SOCKET_NAME, EmbeddedError, EmbeddedRedis, reachable
from fastagi.keys import Keys
from fastagi.redis_link import SharedLink
from fastagi.store import Policy, Store, StoreError, redis_client

if TYPE_CHECKING:
    from fastagi.server import FastAGIServer

log = logging.getLogger("fastagi")


class UsageError(Exception):
    """Bad input on the command line: exit 2, nothing changed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastagi-ctl", description="Caller screening for Asterisk PBXs.")
    parser.add_argument("--config", metavar="PATH", help="TOML config file")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the FastAGI server (and the ban agent)")
    serve.add_argument("--listen", metavar="HOST:PORT")
    serve.add_argument("--redis", metavar="URL")
    serve.add_argument("--firewall", metavar="BACKEND")
    serve.add_argument("--no-agent", action="store_true", help="do not apply bans here")
    serve.set_defaults(func=cmd_serve)

    agent = sub.add_parser("agent", help="apply the shared ban list to this host's firewall")
    agent.add_argument("--redis", metavar="URL")
    agent.add_argument("--firewall", metavar="BACKEND")
    agent.set_defaults(func=cmd_agent)

    ban = sub.add_parser("ban", help="ban an address on every PBX")
    ban.add_argument("ip")
    ban.add_argument("--for", dest="duration", metavar="DURATION")
    ban.add_argument("--reason", default="manual")
    ban.set_defaults(func=cmd_ban)

    unban = sub.add_parser("unban", help="lift bans on every PBX and reset the counts")
    unban.add_argument("ips", nargs="*", metavar="IP")
    unban.add_argument("--all", action="store_true")
    unban.set_defaults(func=cmd_unban)

    status = sub.add_parser("status", help="what is counted and banned, cluster-wide")
    status.add_argument("ip", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    check = sub.add_parser("check", help="config, Redis, firewall: what works and what not")
    check.set_defaults(func=cmd_check)

    simulate = sub.add_parser("simulate", help="play Asterisk: open FastAGI sessions")
    simulate.add_argument("--target", metavar="URL", help="default: agi://<listen>/screen")
    simulate.add_argument("--ip", required=True, help="the caller's address")
    simulate.add_argument("--calls", type=int, default=1)
    simulate.add_argument("--exten", default="7001", help="dialed number (%%-escapes decoded)")
    simulate.add_argument(
        "--type", dest="channel_type", default="SIP", choices=["SIP", "PJSIP", "Local"]
    )
    simulate.set_defaults(func=cmd_simulate)
    return parser


# Command-line flags that override a config key, by the variable that carries them.
FLAG_OVERRIDES = {
    "FASTAGI_SERVER_LISTEN": ("listen", "--listen"),
    "FASTAGI_REDIS_URL": ("redis", "--redis"),
    "FASTAGI_FIREWALL_BACKEND": ("firewall", "--firewall"),
}


def _load_config(args: argparse.Namespace) -> Config:
    flags = {
        variable: (getattr(args, attribute, None), flag)
        for variable, (attribute, flag) in FLAG_OVERRIDES.items()
    }
    environ = dict(os.environ)
    environ.update({variable: value for variable, (value, _) in flags.items() if value})
    try:
        return configuration.load(args.config, environ)
    except ConfigError as error:
        message = str(error)
        for variable, (value, flag) in flags.items():
            if value and message.startswith(f"{variable}:"):
                raise ConfigError(flag + message[len(variable) :]) from None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _load_config(args)
        if args.func in (cmd_serve, cmd_agent):
            return _run_service(args.func(args, config))
        return asyncio.run(args.func(args, config))
    except (ConfigError, UsageError, AddressError) as error:
        print(f"fastagi-ctl: {error}", file=sys.stderr)
        return 2
    except (StoreError, EmbeddedError, OSError) as error:
        print(f"fastagi-ctl: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- the store, as the service or as a client of a running service ---------------


def make_store(config: Config, client: Any, link: SharedLink | None = None) -> Store:
    return Store(
        client,
        Keys(config.redis.key_prefix),
        Policy.from_config(config.screening),
        configuration.pbx_id(config),
        wait=(config.redis.wait_replicas, config.redis.wait_timeout),
        link=link,
    )


def make_service_store(config: Config) -> Store:
    """The service's store on a shared Redis: no per-command socket timeout (every
    caller has a deadline) and, unless Cluster or WAIT needs redis-py's own client,
    one connection shared by the screening steps (redis_link.py)."""
    client = redis_client(config.redis, caller_deadlines=True)
    link = None
    if not config.redis.cluster and not config.redis.wait_replicas:
        link = SharedLink(client.connection_pool.make_connection)
    return make_store(config, client, link)


def make_server(config: Config, store: Store, metrics: Any = None) -> FastAGIServer:
    """The FastAGI server and its screener as `serve` runs them; `metrics` observes both.

    The Redis step gets at most half of a session and three `redis.timeout`s, so a
    slow Redis still leaves time to answer Asterisk."""
    from fastagi.screening import Screener
    from fastagi.server import FastAGIServer

    server = config.server
    redis_budget = min(server.session_timeout / 2, 3 * config.redis.timeout)
    screening = config.screening
    screener = Screener(store, screening.ignore, screening.log_notice, redis_budget, metrics)
    return FastAGIServer(
        screener,
        server.allowed_clients,
        server.max_sessions,
        server.session_timeout,
        observer=metrics,
    )


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


def _address(text: str, config: Config, refuse_ignored: bool) -> IPAddress:
    try:
        address = parse_address(text)
    except AddressError as error:
        raise UsageError(str(error)) from None
    if refuse_ignored and address in config.screening.ignore:
        raise UsageError(f"{address} is in screening.ignore: refusing to ban it")
    return address


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))


# -- commands ----------------------------------------------------------------------


async def cmd_ban(args: argparse.Namespace, config: Config) -> int:
    address = _address(args.ip, config, refuse_ignored=True)
    duration = None
    if args.duration:
        try:
            duration = parse_duration(args.duration)
        except ValueError as error:
            raise UsageError(f"--for: {error}") from None
    async with client_store(config) as store:
        until = await store.ban(str(address), duration, args.reason[:64])
    print(f"{address} banned until {_when(until)}")
    return 0


async def cmd_unban(args: argparse.Namespace, config: Config) -> int:
    if args.all == bool(args.ips):
        raise UsageError("give one or more IPs, or --all")
    addresses = [str(_address(ip, config, refuse_ignored=False)) for ip in args.ips]
    async with client_store(config) as store:
        lifted = await (store.unban_all() if args.all else store.unban(addresses))
    for ip in addresses:
        print(f"{ip} unbanned" if ip in lifted else f"{ip} was not banned (count reset)")
    if args.all:
        print(f"{len(lifted)} bans lifted")
    return 0


async def gather_status(store: Store, config: Config) -> dict[str, Any]:
    banned, counted, totals, agents = await asyncio.gather(
        store.banned(), store.counted(), store.totals(), store.agents()
    )
    records = await asyncio.gather(*(store.record(ip) for ip in banned))
    return {
        "pbx_id": store.pbx_id,
        "store": {"url": _redacted(config.redis.url), "reachable": True},
        "firewall": {"backend": config.firewall.backend, "chain": config.firewall.chain},
        "calls": totals.get("calls", 0),
        "injections": totals.get("injections", 0),
        "counted": {
            "current": len(counted),
            "list": [{"ip": ip, "count": n} for ip, n in sorted(counted.items())],
        },
        "banned": {
            "current": len(banned),
            "total": totals.get("bans", 0),
            "list": [
                {
                    "ip": ip,
                    "until": until,
                    "pbx_id": record.get("pbx_id", ""),
                    "reason": record.get("reason", ""),
                    "bans": int(record.get("bans", "1")),
                }
                for (ip, until), record in zip(banned.items(), records, strict=True)
            ],
        },
        "unbanned_total": totals.get("unbans", 0),
        "agents": [
            {
                "pbx_id": pbx,
                "last_heartbeat": info.get("time"),
                "bans_applied": info.get("applied", 0),
                "backend": info.get("backend", ""),
            }
            for pbx, info in sorted(agents.items())
        ],
    }


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def render_status(status: dict[str, Any]) -> str:
    """The `fail2ban-client status JAIL` look."""
    now = time.time()
    lines = [
        f"Status for fastagi-screen (pbx {status['pbx_id']})",
        f"|- Store:    {status['store']['url']}",
        f"|- Firewall: {status['firewall']['backend']} (chain {status['firewall']['chain']})",
        "|- Screening",
        f"|  |- Currently counted: {status['counted']['current']}",
        f"|  |- Total calls:       {status['calls']}",
        f"|  |- Injection attempts: {status['injections']}",
        (
            "|  `- Counted IP list:   "
            + " ".join(f"{c['ip']}({c['count']})" for c in status["counted"]["list"])
        ).rstrip(),
        "|- Actions",
        f"|  |- Currently banned: {status['banned']['current']}",
        f"|  |- Total banned:     {status['banned']['total']}",
        "|  `- Banned IP list:",
    ]
    for ban in status["banned"]["list"]:
        lines.append(
            f"|     {ban['ip']} until {_when(ban['until'])} "
            f"(by {ban['pbx_id'] or '?'}, {ban['reason']}, ban #{ban['bans']})"
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
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace, config: Config) -> int:
    address = str(_address(args.ip, config, refuse_ignored=False)) if args.ip else ""
    async with client_store(config) as store:
        if address:
            banned = await store.banned()
            record, count = await store.record(address), await store.count(address)
            report: dict[str, Any] = {
                "ip": address,
                "count": count,
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
                if report["banned"]:
                    print(f"|- Banned until:    {_when(report['until'])}")
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
    return 0


async def cmd_check(args: argparse.Namespace, config: Config) -> int:
    from fastagi.firewall import create
    from fastagi.firewall.base import FirewallError

    ok = True
    print(f"ok   config: {config.source}")
    try:
        async with client_store(config) as store:
            await store.ping()
        print(f"ok   store: {_redacted(config.redis.url)} answers")
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
    return 0 if ok else 1


async def cmd_simulate(args: argparse.Namespace, config: Config) -> int:
    from fastagi.emulator import Call, FakeAsterisk

    try:
        address = parse_address(args.ip)
    except AddressError as error:
        raise UsageError(f"--ip: {error}") from None
    host, port = config.server.listen
    target = args.target or f"agi://{host}:{port}/screen"
    if not target.startswith("agi://") or (urlsplit(target).port is None and ":" in target[6:]):
        raise UsageError(f"--target: {target!r} is not agi://HOST[:PORT]/ROUTE")
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


# -- long-running commands ---------------------------------------------------------


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def _setup_logging() -> None:
    logs.setup(os.environ.get("FASTAGI_LOG_LEVEL", "INFO"))


def _run_service(main: Coroutine[Any, Any, int]) -> int:
    """Long-running commands run on uvloop (about 17% less CPU per session than the
    default loop in bench/), the short ones on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def open_service_store(config: Config) -> tuple[Store, EmbeddedRedis | None]:
    if config.redis.url.startswith("memory://"):
        embedded = EmbeddedRedis(config.runtime_dir())
        embedded.start()
        return make_store(config, embedded.client()), embedded
    store = make_service_store(config)
    try:
        async with asyncio.timeout(max(1.0, 4 * config.redis.timeout)):
            await store.ping()
    except TimeoutError:
        log.warning("Redis did not answer; serving anyway, calls get SCREEN_RESULT=ERROR")
    except StoreError as error:
        log.warning("%s; serving anyway, calls get SCREEN_RESULT=ERROR until it answers", error)
    return store, None


async def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from fastagi import metrics as service_metrics

    _setup_logging()
    store, embedded = await open_service_store(config)
    try:
        metrics = service_metrics.start(config.metrics.listen, store)
    except OSError as error:
        await store.close()
        if embedded is not None:
            embedded.stop()
        raise OSError(f"[metrics] listen {config.metrics.listen}: {error.strerror}") from None
    server_cfg = config.server
    server = make_server(config, store, metrics)
    agent = None
    try:
        bound = await server.start(*server_cfg.listen)
        if not args.no_agent:
            agent = await _start_agent(config, store)
        where = ", ".join(f"{h}:{p}" for h, p in bound)
        log.info(
            "fastagi-screen listening on %s (store %s, firewall %s%s)",
            where,
            _redacted(config.redis.url),
            config.firewall.backend,
            "" if agent else ", no agent",
        )
        await _until_signalled()
    finally:
        await server.stop()
        await _stop_agent(agent)
        if metrics is not None:
            metrics.close()
        await store.close()
        if embedded is not None:
            embedded.stop()
    return 0


# The agent waits on the event stream this long per read; its own client's timeout is
# longer than that (the per-call budget of `redis.timeout` is for Asterisk's sessions).
AGENT_BLOCK_MS = 500


async def _start_agent(
    config: Config, store: Store | None
) -> tuple[Agent, asyncio.Task, Store | None]:
    """The agent, on the service's store (embedded) or on a Redis client of its own."""
    from fastagi.firewall import create

    own_store = None
    block_ms = None  # the embedded store cannot block: the agent polls it
    if not config.redis.url.startswith("memory://"):
        timeout = AGENT_BLOCK_MS / 1000 + max(1.0, 4 * config.redis.timeout)
        own_store = store = make_store(config, redis_client(replace(config.redis, timeout=timeout)))
        block_ms = AGENT_BLOCK_MS
    assert store is not None
    agent = Agent(
        store,
        create(config.firewall.settings()),
        config.firewall.sync_interval,
        config.screening.ignore,
        block_ms=block_ms,
    )
    return agent, asyncio.create_task(agent.run(), name="agent"), own_store


async def _stop_agent(running: tuple[Agent, asyncio.Task, Store | None] | None) -> None:
    if running is not None:
        agent, task, own_store = running
        agent.stop()
        await asyncio.gather(task, return_exceptions=True)
        if own_store is not None:
            await own_store.close()


async def cmd_agent(args: argparse.Namespace, config: Config) -> int:
    if config.redis.url.startswith("memory://"):
        raise UsageError("agent needs a shared Redis ([redis] url); with memory:// use serve")
    from fastagi import metrics as service_metrics

    _setup_logging()
    try:
        metrics = service_metrics.start(config.metrics.listen, None)
    except OSError as error:
        raise OSError(f"[metrics] listen {config.metrics.listen}: {error.strerror}") from None
    agent = await _start_agent(config, None)
    try:
        await _until_signalled()
    finally:
        await _stop_agent(agent)
        if metrics is not None:
            metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
