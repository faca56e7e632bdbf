"""Escalation, off by default: when `screening.escalate_after` prefixes inside one
wider IPv6 prefix (`screening.escalate_prefix`, e.g. a /48) are banned at the same
time, the wider prefix is banned too. A scanner that owns a /48 and moves to a fresh
/64 after each ban is then banned whole after a few of them.

Only bans made by the threshold escalate (not `fastagi-ctl ban` or fail2ban's), and
never a wider prefix that would cover an `ignore` network. The store keeps, per wider
prefix, the running bans inside it (keys.inside): one small pipeline per new ban,
nothing per counted call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastagi.addresses import AddressSet, IPNetwork, target_text
from fastagi.store import Store

log = logging.getLogger("fastagi.screening")


@dataclass(frozen=True)
class Escalation:
    prefix: int = 0  # 0: off
    after: int = 4

    def wider(self, target: IPNetwork, ignore: AddressSet) -> IPNetwork | None:
        """The prefix a new ban of `target` counts toward, if any."""
        if not self.prefix or target.version != 6 or target.prefixlen <= self.prefix:
            return None
        wider = target.supernet(new_prefix=self.prefix)
        return None if wider in ignore else wider

    async def after_ban(
        self, store: Store, target: IPNetwork, until: float, ignore: AddressSet
    ) -> float | None:
        """Called for each new threshold ban; the wider prefix's ban end when this one
        escalated it. StoreError passes through: the caller logs it."""
        wider = self.wider(target, ignore)
        if wider is None:
            return None
        text = target_text(wider)
        running, banned = await store.note_inside(text, target_text(target), until)
        if running < self.after or banned:
            return None
        ends = await store.ban(text, None, "escalated", hold="escalation")
        log.warning(
            "%s banned: %d prefixes inside it are banned (screening.escalate_after = %d)",
            text,
            running,
            self.after,
        )
        return ends
