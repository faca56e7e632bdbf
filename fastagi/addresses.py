"""Caller addresses and ban targets: parse what Asterisk or an admin gives us, the
`ignore` list, and the prefix a caller is counted and banned under.

Every address that reaches the store goes through `parse_address`, so a caller is
always the canonical text of one host (no port, no brackets, IPv4-mapped IPv6
folded to IPv4): the same caller can never hide behind two spellings. A scanner owns
a whole IPv6 /64 (often a /48), so callers are counted and banned per prefix
(`Prefixes`): the store's key is the target's canonical text, `target_text`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# The widest prefix a caller may be counted under or an admin may ban: wider would cut
# off a provider's customers wholesale.
WIDEST = {4: 16, 6: 32}


_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an interface name (IFNAMSIZ) or index
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class AddressError(ValueError):
    """Text that is not one IP address."""


@functools.lru_cache(maxsize=4096)  # a scan repeats its few addresses: parse each once
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


def parse_target(text: str) -> IPNetwork:
    """Parse a ban target: one address (`2001:db8::9`, a /128) or a network in CIDR
    text (`2001:db8:1:2::/64`). Strict: host bits set in a network are refused, since
    `2001:db8::9/64` is more likely a typo than a wish to ban the whole /64. An
    IPv4-mapped target is folded to IPv4, as `parse_address` folds addresses."""
    candidate = text.strip()
    if "/" not in candidate:
        try:  # the common case (an agent reads 100,000 at a reconcile): 3x faster
            return ipaddress.IPv4Network(socket.inet_pton(socket.AF_INET, candidate))
        except (OSError, ValueError):  # not dotted IPv4 (a NUL or non-ASCII: ValueError)
            pass
        return ipaddress.ip_network(parse_address(candidate))
    try:
        network = ipaddress.ip_network(candidate, strict=True)
    except ValueError:
        raise AddressError(f"not an IP address or network: {text[:64]!r}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def target_text(network: IPNetwork) -> str:
    """The canonical text of a ban target, the store's key: a bare address for a single
    host (as before prefixes existed), else the compressed CIDR ("2001:db8:1:2::/64")."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return network.compressed


def overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    """Do two targets share an address (never across IPv4 and IPv6)?"""
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Prefixes:
    """`screening.ipv4_prefix` / `ipv6_prefix`: the network a caller is counted and
    banned under, so 12 addresses of one /64 reach the threshold together."""

    ipv4: int = 32
    ipv6: int = 64

    def length(self, version: int) -> int:
        return self.ipv4 if version == 4 else self.ipv6

    def target(self, address: IPAddress, avoid: AddressSet | None = None) -> IPNetwork:
        """The caller's prefix; just the address when that prefix would also cover an
        `avoid` network (an ignored office inside the scanner's /64 stays reachable), and
        for a link-local caller (fe80::/64 is every host of the link, not one owner's)."""
        if address.is_link_local:
            return ipaddress.ip_network(address)
        network = ipaddress.ip_network((address, self.length(address.version)), strict=False)
        if avoid is not None and network in avoid:
            return ipaddress.ip_network(address)
        return network

    def key(self, address: IPAddress, avoid: AddressSet | None = None) -> str:
        """target_text(target(...)) without building a network where the prefix is the
        whole address (IPv4 /32 by default): ipaddress takes ~12 us to make one, on
        every screened call."""
        length = self.length(address.version)
        if length == address.max_prefixlen or address.is_link_local:
            return str(address)
        bits = address.max_prefixlen - length
        first = int(address) >> bits << bits
        last = first | (1 << bits) - 1
        if avoid is not None and avoid.overlaps_range(address.version, first, last):
            return str(address)
        return f"{type(address)(first)}/{length}"

    def widen(self, network: IPNetwork) -> IPNetwork:
        """An admin's target, at least as wide as the configured prefix: `ban`, `unban`
        and `status` of one address act on the prefix the screening counts."""
        length = self.length(network.version)
        if network.prefixlen <= length:
            return network
        return network.supernet(new_prefix=length)


class AddressSet:
    """A list of networks (`ignore`, `allowed_clients`) with a membership test.

    Callers are IPv4 when Asterisk says `::ffff:192.0.2.9` (parse_address folds it), so
    an entry in IPv4-mapped form (`::ffff:192.0.2.0/120`) also matches as its IPv4
    network, and a mapped address is tested as IPv4: one caller, one answer."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._match = tuple(_unmapped(network) for network in self.networks)
        self._ranges = tuple(
            (n.version, int(n.network_address), int(n.broadcast_address)) for n in self._match
        )

    def overlaps_range(self, version: int, first: int, last: int) -> bool:
        """Does any network overlap the addresses first..last (as integers)? The
        per-call form of `network in self`, without building a network."""
        for v, lo, hi in self._ranges:  # noqa: SIM110 - no generator per question: faster
            if v == version and lo <= last and first <= hi:
                return True
        return False

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressSet:
        return cls(parse_network(entry) for entry in entries)

    def __contains__(self, item: IPAddress | IPNetwork) -> bool:
        """An address inside one of the networks; a network (a ban target) that overlaps
        one: banning it would also cut off the listed addresses."""
        if not self._ranges:
            return False  # the common `ignore`: nothing (an agent asks 100,000 times)
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            item = _unmapped(item)  # then as integers: an agent asks for each of 100,000
            first = int(item.network_address)
            last = first | (1 << item.max_prefixlen - item.prefixlen) - 1
            return self.overlaps_range(item.version, first, last)
        if isinstance(item, ipaddress.IPv6Address) and item.ipv4_mapped is not None:
            item = item.ipv4_mapped
        return any(item in network for network in self._match)

    def __iter__(self):
        return iter(self.networks)


def _unmapped(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network as the IPv4 network it stands for."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        first = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((first, network.prefixlen - 96))
    return network
