"""The one interface every firewall backend implements.

Shaped like crowdsec's firewall bouncer: set up our own chain/table/set, add and
delete bans in batches, replace the whole list at once (reconcile), list, tear down.
A backend knows nothing of AGI or Redis; the agent drives it from the ban list.
`until` may be math.inf for a ban with no end. Every method blocks (libiptc,
libnftables, ipset): the agent calls them from one worker thread, never from the
loop that answers Asterisk.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# SIP signalling, as fail2ban's asterisk jail: a ban costs the address its SIP only.
SIP_PORTS = ("5060/udp", "5060/tcp", "5061/udp", "5061/tcp")
# The mark on every object we create (nft table comment, iptables rule comment): an
# object of our configured name without it is someone else's and is never touched.
OWNER_MARK = "fastagi-screen"


class FirewallError(Exception):
    """A backend could not do what was asked; the message says what and why."""


class FirewallConflict(FirewallError):
    """An object with our configured name exists and we did not create it (a
    distribution's `inet filter` table, fail2ban's chain): refused, nothing touched."""


@dataclass(frozen=True)
class FirewallSettings:
    """The `[firewall]` config section, as the backends need it."""

    backend: str = "dry-run"
    chain: str = "FASTAGI"
    # "all", or port/proto strings such as "5060/udp"
    ports: tuple[str, ...] | str = SIP_PORTS
    forward: bool = False


@dataclass(frozen=True)
class CheckResult:
    """One line of `fastagi-ctl check`: what was tried, whether it works, and why not."""

    what: str
    ok: bool
    detail: str = ""


@dataclass
class FirewallStats:
    """What a backend reports for metrics and `status`."""

    backend: str
    size: int = 0
    adds: int = 0
    deletes: int = 0
    errors: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class Firewall(Protocol):
    """A firewall we can ban networks in (a single address is a /32 or /128 network).
    `until` is a unix time (float seconds)."""

    name: str

    def claim(self) -> None:
        """Raise FirewallConflict (one line) when an object of our configured name exists
        and is not ours; read-only. setup() calls it first; the agent before it starts."""

    def setup(self) -> None:
        """Create our chain/table/set and the single jump/hook; idempotent, also repairs,
        and recreates our own objects left by an older version with another type."""

    def add(self, bans: Mapping[IPNetwork, float]) -> None:
        """Ban these networks until the given times, in one batch."""

    def delete(self, networks: Iterable[IPNetwork]) -> None:
        """Lift these bans in one batch; networks not banned are ignored."""

    def set(self, bans: Mapping[IPNetwork, float]) -> None:
        """Make the ban list exactly `bans` (reconcile), touching nothing else."""

    def list(self) -> dict[IPNetwork, float | None]:
        """Networks banned now, with their expiry when the backend knows it."""

    def expire(self, now: float | None = None) -> list[IPNetwork]:
        """Lift bans whose time has passed where the kernel cannot (iptables, dry-run).

        Kernel-timeout backends (nftables, ipset) return [] at once. The agent calls this
        every second or so, so bans expire even while Redis is unreachable.
        """

    def intact(self, expected: Mapping[IPNetwork, float]) -> bool:
        """A cheap check (no full read-back where the backend can avoid it) that our
        chain/table/set still exists and still holds `expected` (what the agent put
        there). False makes the agent rewrite the whole list with set(). Optional: the
        agent treats a backend without it as never intact."""

    def teardown(self) -> None:
        """Remove our chain/table/set and hook; used by tests and `agent --teardown`."""

    def check(self) -> list[CheckResult]:
        """What works and what does not on this host, for `fastagi-ctl check`."""

    def stats(self) -> FirewallStats:
        """Counters and the current size."""
