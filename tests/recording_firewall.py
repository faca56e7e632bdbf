"""A firewall in memory for agent tests: on a clock of the test's choosing (a PBX whose
clock is off), it records the remaining time of every ban it is given, and can be told
to fail the next calls (a bug or a broken backend)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from fastagi.firewall._common import expected_bounds
from fastagi.firewall.base import IPNetwork


class RecordingFirewall:
    name = "recording"
    intact_sees_entries = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.bans: dict[IPNetwork, float] = {}
        self.remaining: dict[IPNetwork, float] = {}  # seconds left when it was applied
        self.failures: list[Exception] = []  # raised, one per call, before doing anything

    def _maybe_fail(self) -> None:
        if self.failures:
            raise self.failures.pop(0)

    def setup(self) -> None:
        self._maybe_fail()

    def add(self, bans: Mapping[IPNetwork, float]) -> None:
        self._maybe_fail()
        now = self.clock()
        for address, until in bans.items():
            if until > now:
                self.bans[address] = until
                self.remaining[address] = until - now

    def delete(self, addresses: Iterable[IPNetwork]) -> None:
        self._maybe_fail()
        for address in addresses:
            self.bans.pop(address, None)

    def set(self, bans: Mapping[IPNetwork, float]) -> None:
        self.bans = {}
        self.add(bans)

    def list(self) -> dict[IPNetwork, float | None]:
        return dict(self.bans)

    def intact(self, expected: Mapping[IPNetwork, float]) -> bool:
        must, may = expected_bounds(expected, self.clock())
        return must <= set(self.bans) <= may

    def expire(self, now: float | None = None) -> list[IPNetwork]:
        return []
