"""Caller addresses: parse what Asterisk or an admin gives us, and the `ignore` list.

Every address that reaches the store goes through `parse_address`, so a ban key is
always the canonical text of one host (no port, no brackets, IPv4-mapped IPv6
folded to IPv4): the same caller can never hide behind two spellings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressError(ValueError):
    """Text that is not one IP address."""


def parse_address(text: str) -> IPAddress:
    """Parse `203.0.113.9`, `203.0.113.9:5060`, `2001:db8::9` or `[2001:db8::9]:5060`."""
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
    if "%" in candidate:  # a zone index names an interface, not a caller
        raise AddressError(f"not an IP address: {text!r}")
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        raise AddressError(f"not an IP address: {text!r}") from None
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
    """A list of networks (`ignore`, `allowed_clients`) with a membership test."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressSet:
        return cls(parse_network(entry) for entry in entries)

    def __contains__(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def __iter__(self):
        return iter(self.networks)
