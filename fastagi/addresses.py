"""Caller addresses: parse what Asterisk or an admin gives us, and the `ignore` list.

Every address that reaches the store goes through `parse_address`, so a ban key is
always the canonical text of one host (no port, no brackets, IPv4-mapped IPv6
folded to IPv4): the same caller can never hide behind two spellings.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an interface name (IFNAMSIZ) or index
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class AddressError(ValueError):
    """Text that is not one IP address."""


def parse_address(text: str) -> IPAddress:
    """Parse `203.0.113.9`, `203.0.113.9:5060`, `2001:db8::9` or `[2001:db8::9]:5060`.

    An IPv6 zone (`fe80::1%eth0`: what CHANNEL(recvip) says for a link-local caller)
    names our interface, not the caller: it is dropped, so the caller is counted, banned
    and shown as `fe80::1`, whichever interface it came in on."""
    candidate = text.strip()
    if not candidate or len(candidate) > 64:
        raise AddressError(f"not an IP address: {text[:64]!r}")
    if candidate.startswith("["):
        host, sep, rest = candidate[1:].partition("]")
        if not sep or (rest and not _is_port(rest)):
            raise AddressError(f"not an IP address: {text!r}")
        candidate = host
    elif candidate.count(":") == 1:
        host, _, port = candidate.partition(":")
        if not _is_port(":" + port):
            raise AddressError(f"not an IP address: {text!r}")
        candidate = host
    candidate, percent, zone = candidate.partition("%")
    if percent and not _ZONE.fullmatch(zone):
        raise AddressError(f"not an IP address: {text!r}")
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        raise AddressError(f"not an IP address: {text!r}") from None
    if percent and not isinstance(address, ipaddress.IPv6Address):
        raise AddressError(f"not an IP address: {text!r}")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    digits = text[1:]
    return text.startswith(":") and digits.isascii() and digits.isdigit() and int(digits) < 65536


def parse_network(text: str) -> IPNetwork:
    """Parse one `ignore` / `allowed_clients` entry: a CIDR or a single address."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AddressError(f"not an IP network: {text!r}") from None


class AddressSet:
    """A list of networks (`ignore`, `allowed_clients`) with a membership test.

    Callers are IPv4 when Asterisk says `::ffff:192.0.2.9` (parse_address folds it), so
    an entry in IPv4-mapped form (`::ffff:192.0.2.0/120`) also matches as its IPv4
    network, and a mapped address is tested as IPv4: one caller, one answer."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._match = tuple(_unmapped(network) for network in self.networks)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressSet:
        return cls(parse_network(entry) for entry in entries)

    def __contains__(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._match)

    def __iter__(self):
        return iter(self.networks)


def _unmapped(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network as the IPv4 network it stands for."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        first = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((first, network.prefixlen - 96))
    return network
