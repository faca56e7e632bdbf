"""`[firewall]`: which backend the agent drives, its chain, the ports a ban closes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastagi.firewall import BACKENDS
from fastagi.firewall._common import parse_ports
from fastagi.firewall.base import SIP_PORTS, FirewallError, FirewallSettings

from .values import Schema, boolean, choice, parse_duration, string, string_list


@dataclass(frozen=True)
class FirewallConfig:
    backend: str
    chain: str
    ports: tuple[str, ...] | str
    forward: bool
    sync_interval: float

    def settings(self) -> FirewallSettings:
        return FirewallSettings(self.backend, self.chain, self.ports, self.forward)


def _backend(value: Any) -> str:
    names = ", ".join(BACKENDS)
    return choice(value, BACKENDS, lambda name: f"unknown backend {name!r} (choose one of {names})")


def _chain(value: Any) -> str:
    name = string(value)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,27}", name):
        raise ValueError(f"{name!r}: letters, digits, _ and -, at most 28 characters")
    return name


def _ports(value: Any) -> tuple[str, ...] | str:
    if value == "all":
        return "all"
    ports = string_list(value)
    try:
        parse_ports(ports)  # the backends' own parser: one definition of a valid entry
    except FirewallError as error:
        raise ValueError(str(error).removeprefix("firewall.ports: ")) from None
    return ports


FIREWALL: Schema = {
    "backend": (_backend, "dry-run"),
    "chain": (_chain, "FASTAGI"),
    # SIP signalling only, as fail2ban's asterisk jail: a spoofed ban then costs the
    # spoofed address its SIP, not its trunk, Redis, DNS or SSH traffic.
    "ports": (_ports, list(SIP_PORTS)),
    "forward": (boolean, False),
    "sync_interval": (parse_duration, "30s"),
}
