"""Small helpers the backends share: port specs, families, timeouts."""

from __future__ import annotations

import ipaddress
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fastagi.addresses import AddressError, parse_target

from .base import CheckResult, FirewallError, FirewallStats, IPNetwork

PROTOCOLS = ("udp", "tcp")
_PORT_RE = re.compile(r"^(\d{1,5})(?:[-:](\d{1,5}))?/(udp|tcp)$")


@dataclass(frozen=True)
class PortSpec:
    """One `ports` entry: a port or an inclusive range, for one protocol."""

    first: int
    last: int
    proto: str

    def nft(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def iptables(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


def parse_ports(ports: Iterable[str] | str) -> list[PortSpec] | None:
    """None for "all", else the list of port specs; FirewallError names a bad entry."""
    if isinstance(ports, str):
        if ports.strip().lower() in ("all", "", "*"):
            return None
        ports = [p for p in ports.split(",")]
    specs: list[PortSpec] = []
    for raw in ports:
        entry = str(raw).strip().lower()
        if entry == "all":
            return None
        match = _PORT_RE.match(entry)
        if not match:
            raise FirewallError(
                f"firewall.ports: {raw!r} is not 'all' or PORT/PROTO such as '5060/udp' "
                f"(PROTO is udp or tcp, PORT may be a range 10000-20000)"
            )
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if not (1 <= first <= last <= 65535):
            raise FirewallError(f"firewall.ports: {raw!r} is not a port in 1-65535")
        spec = PortSpec(first, last, match.group(3))
        if spec not in specs:
            specs.append(spec)
    return specs or None


def ports_by_proto(specs: list[PortSpec]) -> dict[str, list[PortSpec]]:
    out: dict[str, list[PortSpec]] = {}
    for spec in specs:
        out.setdefault(spec.proto, []).append(spec)
    return out


def as_network(value: object) -> IPNetwork:
    """A ban key as a network: networks pass, an address is its /32 or /128, text goes
    through the one parser of targets (an IPv4-mapped one lands where IPv4 is matched)."""
    if isinstance(value, ipaddress.IPv4Network):
        return value
    if isinstance(value, ipaddress.IPv6Network):
        if value.prefixlen < 96 or value.network_address.ipv4_mapped is None:
            return value  # the common case, without a round trip through text
        text = value.compressed
    else:
        text = str(value)
    try:
        return parse_target(text)
    except AddressError as exc:
        raise FirewallError(f"not an IP address or network: {value!r}") from exc


def split_live(
    bans: Mapping[IPNetwork, float], now: float | None = None
) -> tuple[dict[IPNetwork, float], list[IPNetwork]]:
    """(bans still running, networks whose time has already passed)."""
    now = time.time() if now is None else now
    live: dict[IPNetwork, float] = {}
    past: list[IPNetwork] = []
    for key, until in bans.items():  # one pass: a network's hash costs ~2 us
        network = as_network(key)
        if until > now:
            live[network] = float(until)
        else:
            past.append(network)
    return live, past


def flatten(bans: Mapping[IPNetwork, float]) -> dict[IPNetwork, float]:
    """The bans with no network inside another: each one inside a wider banned network
    is folded into it, which then holds until the later of their ends.

    For nftables, whose interval sets refuse overlapping elements (a /64 banned, then
    its /48 after an escalation or a changed ipv6_prefix). Folding errs on the side of
    the ban: the wider network may stay a little longer, nothing inside it gets out."""
    out: dict[IPNetwork, float] = {}
    lengths: dict[int, list[int]] = {4: [], 6: []}  # prefix lengths kept so far, widest first
    for network, until in sorted(bans.items(), key=lambda b: (b[0].version, b[0].prefixlen)):
        outer = None
        for length in lengths[network.version]:  # few distinct lengths: /32, /64, /48 ...
            if length >= network.prefixlen:
                break
            candidate = network.supernet(new_prefix=length)
            if candidate in out:
                outer = candidate
                break
        if outer is None:
            out[network] = until
            if network.prefixlen not in lengths[network.version]:
                lengths[network.version].append(network.prefixlen)
        else:
            out[outer] = max(out[outer], until)
    return out


def remaining_ms(until: float, now: float, cap_ms: int | None = None) -> int | None:
    """Milliseconds left, at least 1; None for a ban with no end."""
    if math.isinf(until):
        return None
    ms = max(1, math.ceil((until - now) * 1000))
    if cap_ms is not None:
        ms = min(ms, cap_ms)
    return ms


def tool_check(what: str, argv: list[str]) -> tuple[CheckResult, str]:
    """Run a `--version`-style command; (result, its output)."""
    if shutil.which(argv[0]) is None:
        return CheckResult(what, False, f"{argv[0]} not found in PATH (apt install {argv[0]})"), ""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult(what, False, f"{' '.join(argv)} failed: {exc}"), ""
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        last = out.splitlines()[-1] if out else f"exit {proc.returncode}"
        return CheckResult(what, False, permission_hint(f"{' '.join(argv)}: {last}")), out
    return CheckResult(what, True, out.splitlines()[0] if out else ""), out


def permission_hint(message: str) -> str:
    """Add the fix to a permission error."""
    if "ermission" in message or "not permitted" in message:
        return f"{message} (run as root or with CAP_NET_ADMIN)"
    return message


def run(argv: list[str], stdin: str | None = None, timeout: float = 60) -> str:
    """Run a firewall tool; FirewallError with its stderr when it fails."""
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise FirewallError(f"{argv[0]} not found in PATH: install it") from exc
    except subprocess.TimeoutExpired as exc:
        raise FirewallError(f"{argv[0]} did not finish within {timeout}s") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        detail = " | ".join(err[:3]) or f"exit {proc.returncode}"
        raise FirewallError(f"{' '.join(argv[:3])} failed: {detail}")
    return proc.stdout


INTACT_SLACK = 1.5  # seconds around a ban's end where it may or may not be there yet


def expected_bounds(
    expected: Mapping[IPNetwork, float], now: float | None = None
) -> tuple[set[IPNetwork], set[IPNetwork]]:
    """(networks that must be in the firewall, networks that may be), for intact():
    a ban ending within INTACT_SLACK of now may already be gone (kernel timeout)."""
    now = time.time() if now is None else now
    may = {as_network(a) for a in expected}
    must = {as_network(a) for a, until in expected.items() if until > now + INTACT_SLACK}
    return must, may


def count_replaced(stats: FirewallStats, before: Mapping, after: Mapping) -> None:
    """Count what a set() that replaced `before` with `after` added and removed."""
    stats.adds += len(after.keys() - before.keys())
    stats.deletes += len(before.keys() - after.keys())
