"""The protected set: addresses no caller, admin or shared ban list can get banned here.

A caller's address can be spoofed (one UDP INVITE runs the dialplan, no reply needed),
and the shared ban list may be written by another PBX or by hand. So the addresses
whose loss would cut this host off are never counted, never written to the ban list
and never applied by an agent: the special ranges (unspecified, loopback, link-local,
multicast, broadcast, in their IPv4-mapped forms too), this host's own addresses, its
gateways and resolvers, the Redis / Sentinel / Cluster nodes it talks to,
`server.allowed_clients`, `screening.ignore` and `screening.protect` (addresses,
networks and host names). Host names and the host's own view (addresses, routes,
resolvers) are re-read every `screening.protect_refresh`, off the event loop; a name
that stops resolving keeps its last good addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastagi.addresses import AddressSet, IPAddress, IPNetwork, Prefixes

if TYPE_CHECKING:
    from fastagi.config import Config

log = logging.getLogger("fastagi.protect")

Target = IPAddress | IPNetwork

SPECIAL: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("255.255.255.255/32", "broadcast"),
)
_MAPPED = int(ipaddress.IPv6Address("::ffff:0.0.0.0"))  # IPv4-mapped IPv6: ::ffff:a.b.c.d
ROUTE_FILES = (Path("/proc/net/route"), Path("/proc/net/ipv6_route"))
RESOLV_FILES = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))
RESOLVE_TIMEOUT = 5.0  # seconds for one host name; a slow DNS must not hold a start
DISCOVER_TIMEOUT = 2.0  # seconds to ask Sentinel / Cluster for its nodes (Redis may be down)
ONCE_LIMIT = 4096  # distinct keys remembered by OnceLog before it starts afresh


class ProtectedError(Exception):
    """A ban of a protected target was asked for; the message says why it is protected."""


class OnceLog:
    """Which keys were already logged: one line per address, not per call, in bounded
    memory (past ONCE_LIMIT keys it forgets them all and may log some again)."""

    def __init__(self, limit: int = ONCE_LIMIT) -> None:
        self.limit = limit
        self._seen: set[Any] = set()

    def first(self, key: Any) -> bool:
        if key in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add(key)
        return True


@dataclass
class Part:
    """One source of protected networks, for `check` and `status`."""

    source: str  # where the networks come from, in the admin's words
    networks: list[tuple[IPNetwork, str]] = field(default_factory=list)  # network, why
    detail: str = ""  # how it was read, or why it could not be
    ok: bool = True  # False: it could not be read, so the set is missing addresses

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "size": len(self.networks),
            "ok": self.ok,
            "detail": self.detail,
            "entries": [_text(network) for network, _ in self.networks],
        }


def _text(network: IPNetwork) -> str:
    """A bare address for a single host, as ban targets are written."""
    single = network.prefixlen == network.max_prefixlen
    return str(network.network_address) if single else network.compressed


def _span(target: IPAddress | IPNetwork) -> tuple[int, int, int]:
    """(version, first, last) as integers (an address without building a network: the
    caller check runs on every screened call)."""
    if isinstance(target, ipaddress.IPv4Address | ipaddress.IPv6Address):
        number = int(target)
        return target.version, number, number
    first = int(target.network_address)  # the last by arithmetic: broadcast_address makes
    return target.version, first, first | (1 << target.max_prefixlen - target.prefixlen) - 1


class _Index:
    """Protected networks as integer intervals: a dict for single hosts (the usual
    caller check is one lookup) and a short list of wider ranges. Each IPv4 network is
    also entered at its IPv4-mapped place (::ffff:a.b.c.d), so no spelling escapes."""

    def __init__(self, parts: list[Part]) -> None:
        self.hosts: dict[tuple[int, int], str] = {}
        self.ranges: list[tuple[int, int, int, str]] = []
        for part in parts:
            for network, why in part.networks:
                version, low, high = _span(network)
                spans = [(version, low, high)]
                if version == 4:
                    spans.append((6, _MAPPED + low, _MAPPED + high))
                for v, lo, hi in spans:
                    label = why if v == version else f"{why}, IPv4-mapped"
                    if lo == hi:
                        self.hosts.setdefault((v, lo), label)
                    else:
                        self.ranges.append((v, lo, hi, label))
        self.size = sum(len(part.networks) for part in parts)

    def reason(self, target: IPAddress | IPNetwork) -> str | None:
        version, low, high = _span(target)
        if low == high and (why := self.hosts.get((version, low))):
            return why
        for v, lo, hi, why in self.ranges:
            if v == version and lo <= high and low <= hi:
                return why
        if low != high:  # a network: does it hold a protected single host?
            for (v, n), why in self.hosts.items():
                if v == version and low <= n <= high:
                    return why
        return None


# -- this host, read from the kernel of its own network namespace ---------------------

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface
_RTATTR = struct.Struct("=HH")  # length, type
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTF_GATEWAY = 0x2


def host_addresses() -> list[tuple[IPAddress, str]]:
    """Every address of this host (and each subnet's broadcast), with its interface,
    from one rtnetlink dump: no `ip` binary needed, and it sees the network namespace
    the process runs in. Raises OSError when the kernel will not answer."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        header = _NLMSG.pack(
            _NLMSG.size + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        sock.send(header + request)
        found: dict[IPAddress, str] = {}  # an address is both IFA_LOCAL and IFA_ADDRESS
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind = _NLMSG.unpack_from(data, offset)[:2]
                if length < _NLMSG.size:
                    raise OSError("rtnetlink: malformed message")
                if kind == NLMSG_DONE:
                    return list(found.items())
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    raise OSError(-code, f"rtnetlink: {os.strerror(-code)}")
                if kind == RTM_NEWADDR:
                    for address, why in _addresses_of(data, offset, length):
                        found.setdefault(address, why)
                offset += (length + 3) & ~3


def _addresses_of(data: bytes, offset: int, length: int) -> list[tuple[IPAddress, str]]:
    family, _, _, _, index = _IFADDRMSG.unpack_from(data, offset + _NLMSG.size)
    size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
    try:
        name = socket.if_indextoname(index)
    except OSError:
        name = f"interface {index}"
    out = []
    attr, end = offset + _NLMSG.size + _IFADDRMSG.size, offset + length
    while attr + _RTATTR.size <= end:
        attr_length, kind = _RTATTR.unpack_from(data, attr)
        if attr_length < _RTATTR.size:
            break
        raw = data[attr + _RTATTR.size : attr + attr_length]
        if kind in (IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST) and len(raw) == size:
            what = "broadcast" if kind == IFA_BROADCAST else "address"
            out.append((ipaddress.ip_address(raw), f"this host's {what} ({name})"))
        attr += (attr_length + 3) & ~3
    return out


def gateways(files: tuple[Path, Path] = ROUTE_FILES) -> list[IPAddress]:
    """The next hops of this host's routes (the default gateways among them), from the
    kernel's IPv4 and IPv6 routing tables."""
    found: list[IPAddress] = []
    v4, v6 = files
    with contextlib.suppress(OSError):
        for line in v4.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and int(fields[3], 16) & RTF_GATEWAY:
                found.append(ipaddress.IPv4Address(bytes.fromhex(fields[2])[::-1]))
    with contextlib.suppress(OSError):
        for line in v6.read_text().splitlines():
            fields = line.split()
            if len(fields) > 8 and int(fields[8], 16) & RTF_GATEWAY and int(fields[4], 16):
                found.append(ipaddress.IPv6Address(bytes.fromhex(fields[4])))
    return list(dict.fromkeys(found))


def resolvers(files: Iterable[Path] = RESOLV_FILES) -> list[IPAddress]:
    """The name servers this host asks (resolv.conf, and systemd-resolved's upstreams)."""
    found: list[IPAddress] = []
    for path in files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in path.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        found.append(ipaddress.ip_address(fields[1].partition("%")[0]))
    return list(dict.fromkeys(found))


@dataclass
class Sources:
    """Where the host's own view is read from; tests point these elsewhere."""

    host: Callable[[], list[tuple[IPAddress, str]]] = host_addresses
    route_files: tuple[Path, Path] = ROUTE_FILES
    resolv_files: tuple[Path, ...] = RESOLV_FILES
    resolve: Callable[..., Any] | None = None  # async (name) -> addresses; None: the loop's


# -- the set ----------------------------------------------------------------------------


def parse_entry(text: str) -> IPNetwork | str:
    """One `screening.protect` entry: a network or address, else a host name."""
    entry = text.strip()
    with contextlib.suppress(ValueError):
        return ipaddress.ip_network(entry, strict=False)
    name = entry.rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_label(label) for label in labels):
        raise ValueError(f"{text!r} is neither an address, a network nor a host name")
    return name


def _label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and label.isascii()
        and label.replace("-", "").replace("_", "").isalnum()
        and not label.startswith("-")
        and not label.endswith("-")
    )


def _split_hosts(entries: Iterable[tuple[str, str]]) -> tuple[Part, dict[str, str]]:
    """Literal addresses into a part; names (to resolve) with where they came from."""
    literal = Part("", [])
    names: dict[str, str] = {}
    for host, origin in entries:
        try:
            literal.networks.append((ipaddress.ip_network(host), origin))
        except ValueError:
            names.setdefault(host.lower().rstrip("."), origin)
    return literal, names


def redis_hosts(config: Config) -> list[tuple[str, str]]:
    """The Redis and Sentinel hosts the config names, each with the key naming it."""
    hosts = []
    url = urlsplit(config.redis.url)
    if url.scheme in ("redis", "rediss") and url.hostname:
        key = "redis.url (cluster seed)" if config.redis.cluster else "redis.url"
        hosts.append((url.hostname, key))
    for entry in config.redis.sentinels:
        hosts.append((entry.rpartition(":")[0].strip("[]"), "redis.sentinels"))
    return hosts


@dataclass
class _Name:
    origin: str  # "screening.protect", "redis.url", ...
    redis: bool = False  # a Redis / Sentinel node
    addresses: tuple[IPAddress, ...] = ()
    failing: bool = False


class Protected:
    """The protected set of this host; `reason(target)` says why a target is protected.

    Parts built from the config are fixed; this host's view and the host names are
    refreshed by `refresh()` (at start, then every `interval` by `run()`). A refresh
    builds a new index and swaps it in, so readers never see half of one."""

    def __init__(
        self,
        config_parts: list[Part],
        names: dict[str, str],
        interval: float = 300.0,
        sources: Sources | None = None,
    ) -> None:
        self.config_parts = config_parts
        self.names = {
            name: _Name(origin, redis=origin.startswith("redis")) for name, origin in names.items()
        }
        # The nodes behind a Sentinel or a Cluster, which the config does not name
        # (service.py sets it to the store's `nodes`); asked at every refresh.
        self.discover: Callable[[], Awaitable[Iterable[str]]] | None = None
        self._discovery_failing = False
        self.interval = interval
        self.sources = sources or Sources()
        self.host_parts: list[Part] = self._read_host()
        self.generation = 0  # bumped whenever the set changes; the agent re-filters then
        self._index = _Index(self.parts)
        self._task: asyncio.Task | None = None

    @classmethod
    def from_config(cls, config: Config, sources: Sources | None = None) -> Protected:
        special = Part(
            "special ranges",
            [(ipaddress.ip_network(net), f"{why} range {net}") for net, why in SPECIAL],
            "unspecified, loopback, link-local, multicast, broadcast; IPv4-mapped forms too",
        )
        listed = [parse_entry(entry) for entry in config.screening.protect]
        protect = Part(
            "screening.protect",
            [(n, "in screening.protect") for n in listed if not isinstance(n, str)],
        )
        redis_literal, redis_names = _split_hosts(redis_hosts(config))
        redis = Part(
            "Redis nodes", [(n, f"Redis node ({why})") for n, why in redis_literal.networks]
        )
        names = {n: "screening.protect" for n in listed if isinstance(n, str)}
        for name, origin in redis_names.items():
            names.setdefault(name, origin)

        def of(source: str, networks: Iterable[IPNetwork]) -> Part:
            return Part(source, [(n, f"in {source}") for n in networks])

        parts = [
            special,
            redis,
            of("server.allowed_clients", config.server.allowed_clients),
            of("screening.ignore", config.screening.ignore),
            protect,
        ]
        return cls(parts, names, config.screening.protect_refresh, sources)

    # -- reading ----------------------------------------------------------------------

    def reason(self, target: IPAddress | IPNetwork | str) -> str | None:
        """Why `target` (an address or a network) must never be banned here, or None.
        A network is protected when it overlaps any protected network; text that is
        neither raises ValueError."""
        if isinstance(target, str):
            target = ipaddress.ip_network(target, strict=False)
        return self._index.reason(target)

    @property
    def parts(self) -> list[Part]:
        return [
            *self.config_parts[:2],
            *self.host_parts,
            *self._name_parts(),
            *self.config_parts[2:],
        ]

    def _name_parts(self) -> Iterator[Part]:
        by_origin: dict[str, Part] = {}
        for name, state in self.names.items():
            source = "Redis nodes (by name)" if state.redis else f"{state.origin} (by name)"
            detail = f"host names, resolved every {self.interval:.0f}s"
            part = by_origin.setdefault(source, Part(source, [], detail))
            for address in state.addresses:
                why = f"Redis node {name}" if state.redis else name
                part.networks.append((ipaddress.ip_network(address), f"{why} ({state.origin})"))
            if state.failing:
                part.detail += f"; {name} does not resolve now" + (
                    ", last addresses kept" if state.addresses else ""
                )
        return iter(by_origin.values())

    def summary(self) -> dict[str, Any]:
        """The set for `check` and `status`: its size and each part with its source."""
        return {
            "size": self._index.size,
            "refresh_seconds": self.interval,
            "parts": [part.summary() for part in self.parts],
        }

    # -- refreshing -------------------------------------------------------------------

    def _read_host(self) -> list[Part]:
        sources = self.sources
        host = Part("this host", [], "rtnetlink (every interface of this network namespace)")
        try:
            for address, why in sources.host():
                host.networks.append((ipaddress.ip_network(address), why))
        except OSError as error:
            host.detail, host.ok = f"cannot read this host's addresses: {error}", False
        files = ", ".join(str(p) for p in sources.route_files)
        gates = Part("gateways", [], files)
        gates.networks = [
            (ipaddress.ip_network(a), "a gateway of this host")
            for a in gateways(sources.route_files)
        ]
        files = ", ".join(str(p) for p in sources.resolv_files)
        dns = Part("resolvers", [], files)
        dns.networks = [
            (ipaddress.ip_network(a), "a resolver of this host")
            for a in resolvers(sources.resolv_files)
        ]
        return [host, gates, dns]

    async def _resolve(self, name: str) -> tuple[IPAddress, ...]:
        with contextlib.suppress(ValueError):  # a node announced by its address
            return (ipaddress.ip_address(name),)
        if self.sources.resolve is not None:
            found = await self.sources.resolve(name)
            return tuple(ipaddress.ip_address(a) for a in found)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        return tuple(
            dict.fromkeys(ipaddress.ip_address(info[4][0].partition("%")[0]) for info in infos)
        )

    async def _refresh_name(self, name: str, state: _Name) -> None:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                found = await self._resolve(name)
            if not found:
                raise OSError("no addresses")
        except (OSError, TimeoutError, ValueError) as error:
            if not state.failing:
                kept = " ".join(map(str, state.addresses)) or "none"
                log.warning(
                    "%s: cannot resolve %s (%s); keeping its last addresses (%s), "
                    "trying again every %.0fs",
                    state.origin,
                    name,
                    error or "timed out",
                    kept,
                    self.interval,
                )
            state.failing = True
            return
        if state.failing or set(found) != set(state.addresses):
            log.info("%s: %s is %s (protected)", state.origin, name, " ".join(map(str, found)))
        state.failing = False
        state.addresses = found

    async def refresh(self) -> None:
        """Re-read this host's view and re-resolve every name (concurrently, each in a
        resolver thread); swap in the new index and bump `generation` if it changed."""
        await self._discover_nodes()
        await asyncio.gather(*(self._refresh_name(n, s) for n, s in self.names.items()))
        self.host_parts = self._read_host()
        index = _Index(self.parts)
        if (index.hosts, index.ranges) != (self._index.hosts, self._index.ranges):
            self._index = index
            self.generation += 1

    async def _discover_nodes(self) -> None:
        """Add the nodes a Sentinel or Cluster reports; a node once seen stays protected
        (a failed-over master may come back)."""
        if self.discover is None:
            return
        try:
            async with asyncio.timeout(DISCOVER_TIMEOUT):
                hosts = list(await self.discover())
        except Exception as error:  # StoreError, a timeout: the refresh goes on
            if not self._discovery_failing:
                log.warning("cannot ask Redis for its nodes (%s); will try again", error)
            self._discovery_failing = True
            return
        self._discovery_failing = False
        for host in hosts:
            self.names.setdefault(host.lower(), _Name("Sentinel or Cluster", redis=True))

    async def run(self) -> None:
        """Refresh every `interval` until cancelled; never dies of a bad answer."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as error:  # a refresh must never end protection updates
                log.error("protected set: refresh failed: %s", error)

    async def start(self) -> None:
        """The first refresh (bounded: names that time out count as not resolving),
        then the periodic one in the background."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="protect-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def check_ban(self, target: IPAddress | IPNetwork | str) -> None:
        """Raise ProtectedError when `target` must not be banned (the store's guard)."""
        why = self.reason(target)
        if why:
            raise ProtectedError(f"{target} is protected ({why}): refusing to ban it")


def counted_as(
    address: IPAddress, prefixes: Prefixes, ignore: AddressSet, protected: Protected | None
) -> str:
    """The target a caller's calls (and password guesses) are counted and banned under:
    its prefix, or the address alone when that prefix would also cover an ignored or a
    protected address (our own /64 must never be banned)."""
    target = prefixes.key(address, ignore)
    if protected is not None and target != str(address) and protected.reason(target):
        return str(address)
    return target
