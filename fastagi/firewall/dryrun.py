"""The dry-run backend: logs what it would do and keeps the list in memory.

The newcomers' default (no root, no firewall touched) and what most tests run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping

from fastagi.addresses import target_text

from ._common import as_network, expected_bounds, parse_ports, split_live
from .base import CheckResult, FirewallSettings, FirewallStats, IPNetwork

log = logging.getLogger("fastagi.firewall")


class DryRunFirewall:
    name = "dry-run"
    intact_sees_entries = True  # intact() compares the entries: no periodic rewrite

    def __init__(self, settings: FirewallSettings | None = None) -> None:
        self.settings = settings or FirewallSettings()
        self._ports = parse_ports(self.settings.ports)
        self._bans: dict[IPNetwork, float] = {}
        self._lock = threading.Lock()
        self._stats = FirewallStats(backend=self.name)
        self._ready = False

    def claim(self) -> None:
        """Nothing of anyone's is touched here."""

    def setup(self) -> None:
        hooks = "INPUT and FORWARD" if self.settings.forward else "INPUT"
        ports = "all ports" if self._ports is None else ", ".join(map(str, self.settings.ports))
        log.log(
            logging.DEBUG if self._ready else logging.INFO,  # setup() runs every sync
            "dry-run: would create chain %s hooked from %s for %s",
            self.settings.chain,
            hooks,
            ports,
        )
        self._ready = True

    def add(self, bans: Mapping[IPNetwork, float]) -> None:
        live, past = split_live(bans)
        with self._lock:
            for network, until in live.items():
                log.info("dry-run: would ban %s until %s", target_text(network), _when(until))
                self._bans[network] = until
            self._stats.adds += len(live)
            for network in past:
                self._bans.pop(network, None)

    def delete(self, networks: Iterable[IPNetwork]) -> None:
        with self._lock:
            for network in map(as_network, networks):
                if self._bans.pop(network, None) is not None:
                    log.info("dry-run: would lift the ban on %s", target_text(network))
                    self._stats.deletes += 1

    def set(self, bans: Mapping[IPNetwork, float]) -> None:
        live, _ = split_live(bans)
        with self._lock:
            gone = self._bans.keys() - live.keys()
            new = live.keys() - self._bans.keys()
            log.info(
                "dry-run: would set the ban list to %d addresses (+%d -%d)",
                len(live),
                len(new),
                len(gone),
            )
            self._stats.adds += len(new)
            self._stats.deletes += len(gone)
            self._bans = dict(live)

    def expire(self, now: float | None = None) -> list[IPNetwork]:
        now = time.time() if now is None else now
        with self._lock:
            due = [a for a, until in self._bans.items() if until <= now]
            for network in due:
                del self._bans[network]
                log.info("dry-run: ban on %s expired, would lift it", target_text(network))
            self._stats.deletes += len(due)
        return due

    def list(self) -> dict[IPNetwork, float | None]:
        self.expire()
        with self._lock:
            return dict(self._bans)

    def intact(self, expected: Mapping[IPNetwork, float]) -> bool:
        """Holds what the agent put here (give or take bans ending now): without it, the
        agent found us "changed behind our back" at every sync."""
        must, may = expected_bounds(expected)
        with self._lock:
            present = set(self._bans)
        return self._ready and must <= present <= may

    def teardown(self) -> None:
        log.info("dry-run: would remove chain %s and its jump", self.settings.chain)
        with self._lock:
            self._bans.clear()
        self._ready = False

    def check(self) -> list[CheckResult]:
        return [CheckResult("firewall dry-run", True, "bans are logged, no firewall is changed")]

    def stats(self) -> FirewallStats:
        with self._lock:
            self._stats.size = len(self._bans)
            return FirewallStats(**{**self._stats.__dict__, "extra": dict(self._stats.extra)})


def _when(until: float) -> str:
    if until == float("inf"):
        return "forever"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until))
