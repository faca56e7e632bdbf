"""`fastagi-ctl`: a thin command line over the library.

Exit codes: 0 done; 1 the operation failed (e.g. Redis unreachable); 2 bad usage or
bad input, with one line on stderr and nothing changed. Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from fastagi import config as configuration
from fastagi.addresses import AddressError
from fastagi.admin import UsageError, cmd_ban, cmd_check, cmd_simulate, cmd_unban
from fastagi.config import Config, ConfigError
from fastagi.embedded import EmbeddedError, UnsafeRuntimeDir
from fastagi.feeds import cmd_import
from fastagi.protect import ProtectedError
from fastagi.service import ServiceUsageError, cmd_agent, cmd_serve, cmd_watch, run_service
from fastagi.status import cmd_status
from fastagi.store import StoreError


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
    agent.add_argument(
        "--teardown",
        action="store_true",
        help="remove this host's fastagi firewall objects and their bans, then exit",
    )
    agent.set_defaults(func=cmd_agent)

    watch = sub.add_parser(
        "watch", help="count password guessing from the local AMI ([auth]) in the store"
    )
    watch.add_argument("--redis", metavar="URL")
    watch.set_defaults(func=cmd_watch)

    ban = sub.add_parser("ban", help="ban an address on every PBX")
    ban.add_argument("ip")
    ban.add_argument("--for", dest="duration", metavar="DURATION")
    ban.add_argument("--reason", default="manual")
    ban.add_argument(
        "--hold",
        metavar="NAME",
        help="the ban's source (default admin); the longest hold wins, `unban --hold NAME` "
        "lifts only this one",
    )
    ban.set_defaults(func=cmd_ban)

    unban = sub.add_parser("unban", help="lift bans on every PBX and reset the counts")
    unban.add_argument("ips", nargs="*", metavar="IP")
    unban.add_argument("--all", action="store_true")
    unban.add_argument(
        "--hold", metavar="NAME", help="lift only this source's hold (default: every hold)"
    )
    unban.set_defaults(func=cmd_unban)

    status = sub.add_parser("status", help="what is counted and banned, cluster-wide")
    status.add_argument("ip", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    feed = sub.add_parser(
        "import", help="hold every address/CIDR of a blocklist (APIBan JSON, a text list)"
    )
    feed.add_argument("source", help="http(s):// URL or file")
    feed.add_argument("--name", help="the feed's name (hold feed:NAME); a configured one's rules")
    feed.add_argument("--format", choices=["apiban", "plain"], help="default: from the content")
    feed.add_argument(
        "--for", dest="duration", metavar="DURATION", help="how long to hold (default 1d)"
    )
    feed.set_defaults(func=cmd_import)

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
        if args.func in (cmd_serve, cmd_agent, cmd_watch):
            return run_service(args.func(args, config))
        return asyncio.run(args.func(args, config))
    except (
        ConfigError,
        UsageError,
        ServiceUsageError,
        AddressError,
        UnsafeRuntimeDir,
        ProtectedError,
    ) as error:
        print(f"fastagi-ctl: {error}", file=sys.stderr)
        return 2
    except (StoreError, EmbeddedError, OSError) as error:
        print(f"fastagi-ctl: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
