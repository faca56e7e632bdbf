"""Webhook senders' lease and cursor in the store (fastagi/notify.py): one sender per hook
across the cluster, resuming where the last one stopped."""

from __future__ import annotations

from fastagi.store.base import (
    StoreBase,
    as_text,
)


class Notifications(StoreBase):
    """The Store's webhook lease and cursor."""

    async def notify_lease(self, hook: str, token: str, lease: float, keep: float) -> bool:
        """Take or renew `hook`'s sender lease for `lease` seconds (its cursor kept
        `keep` seconds); False while another process holds it."""
        keys = [self.keys.notify_lease(hook), self.keys.notify_cursor(hook)]
        args = [token, int(lease * 1000), int(keep * 1000)]
        return bool(await self._call("notify lease", self._notify_lease(keys=keys, args=args)))

    async def notify_owner(self, hook: str) -> str | None:
        """Who holds `hook`'s sender lease now (its token, `<random>@<pbx_id>`), or None."""
        value = await self._call("notify read", self.redis.get(self.keys.notify_lease(hook)))
        return None if value is None else as_text(value)

    async def notify_cursor(self, hook: str) -> str | None:
        """The last event `hook`'s receiver got, or None (no sender yet, or long ago)."""
        value = await self._call("notify read", self.redis.get(self.keys.notify_cursor(hook)))
        return None if value is None else as_text(value)

    async def notify_advance(self, hook: str, token: str, event_id: str, keep: float) -> bool:
        """Move `hook`'s cursor to `event_id` if the lease is still `token`'s."""
        keys = [self.keys.notify_lease(hook), self.keys.notify_cursor(hook)]
        args = [token, event_id, int(keep * 1000)]
        return bool(await self._call("notify cursor", self._notify_cursor(keys=keys, args=args)))

    async def notify_release(self, hook: str, token: str) -> None:
        """Give `hook`'s lease up if it is `token`'s (a sender that stops)."""
        keys = [self.keys.notify_lease(hook)]
        await self._call("notify release", self._notify_release(keys=keys, args=[token]))
