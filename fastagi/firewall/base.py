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

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FirewallError(Exception):
    """A backend could not do what was asked; the message says what and why."""


@dataclass(frozen=True)
class FirewallSettings:
    """The `[firewall]` config section, as the backends need it."""

    backend: str = "dry-run"
    chain: str = "FASTAGI"
    # "all", or port/proto strings such as "5060/udp"
    ports: tuple[str, ...] | str = "all"
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
    """A firewall we can ban addresses in. `until` is a unix time (float seconds)."""

    name: str

    def setup(self) -> None:
        """Create our chain/table/set and the single jump/hook; idempotent, also repairs."""

    def add(self, bans: Mapping[IPAddress, float]) -> None:
        """Ban these addresses until the given times, in one batch."""

    def delete(self, addresses: Iterable[IPAddress]) -> None:
        """Lift these bans in one batch; addresses not banned are ignored."""

    def set(self, bans: Mapping[IPAddress, float]) -> None:
        """Make the ban list exactly `bans` (reconcile), touching nothing else."""

    def list(self) -> dict[IPAddress, float | None]:
        """Addresses banned now, with their expiry when the backend knows it."""

    def expire(self, now: float | None = None) -> list[IPAddress]:
        """Lift bans whose time has passed where the kernel cannot (iptables, dry-run).

        Kernel-timeout backends (nftables, ipset) return [] at once. The agent calls this
        every second or so, so bans expire even while Redis is unreachable.
        """

    def intact(self, expected: Mapping[IPAddress, float]) -> bool:
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
