"""The ban agent: makes this host's firewall follow the shared ban list.

It reconciles at start, every `sync_interval` and after any gap (Redis unreachable,
events trimmed away), and applies ban/unban events as they arrive, so a ban reaches
every connected PBX within milliseconds. Bans expire locally even while Redis is
unreachable (kernel timeouts where the backend has them, a local timer always).
Firewall calls block (libiptc, nft, ipset), so they run in one worker thread, never
on the loop that answers Asterisk. Stopping leaves the bans in place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastagi.addresses import AddressError, AddressSet, IPAddress, parse_address
from fastagi.firewall.base import Firewall, FirewallError
from fastagi.store import Store, StoreError

log = logging.getLogger("fastagi.agent")

HEARTBEAT_INTERVAL = 5.0
RETRY_MAX = 5.0


def _event_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class Agent:
    def __init__(
        self,
        store: Store,
        firewall: Firewall,
        sync_interval: float,
        ignore: AddressSet,
        block_ms: int | None = 100,
        poll_interval: float = 0.05,
    ) -> None:
        self.store = store
        self.firewall = firewall
        self.sync_interval = sync_interval
        self.ignore = ignore
        self.block_ms = block_ms  # None: the store cannot block (embedded); poll instead
        self.poll_interval = poll_interval
        self.applied: dict[IPAddress, float] = {}  # what we put in the firewall, with ends
        self.last_id = "0-0"
        self.applied_total = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="firewall")
        self._next_sync = 0.0
        self._next_heartbeat = 0.0
        self._stopping = False
        self._task: asyncio.Task | None = None

    async def _firewall(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, getattr(self.firewall, method), *args)

    def _wanted(self, bans: dict[str, float]) -> dict[IPAddress, float]:
        wanted = {}
        for text, until in bans.items():
            try:
                address = parse_address(text)
            except AddressError:
                log.error("ignoring a malformed address on the ban list: %r", text[:64])
                continue
            if address in self.ignore:
                log.warning("not banning %s: it is in screening.ignore", address)
                continue
            wanted[address] = until
        return wanted

    async def reconcile(self) -> None:
        """Make the firewall equal the ban list; also restores a flushed chain/table."""
        last_id = await self.store.last_event_id()
        wanted = self._wanted(await self.store.banned())
        await self._firewall("setup")
        await self._firewall("set", wanted)
        self.applied = wanted
        self.last_id = last_id
        self._next_sync = time.monotonic() + self.sync_interval
        log.info("reconciled: %d bans on %s", len(wanted), self.firewall.name)

    async def _missed_events(self) -> bool:
        if self.last_id == "0-0":
            return False
        first = await self.store.first_event_id()
        return first is not None and _event_id(first) > _event_id(self.last_id)

    async def apply(self, events: list[tuple[str, dict[str, str]]]) -> None:
        """Apply a batch of events in order, collapsing them to one add and one delete."""
        adds: dict[IPAddress, float] = {}
        deletes: set[IPAddress] = set()
        for event_id, fields in events:
            self.last_id = event_id
            try:
                address = parse_address(fields.get("ip", ""))
            except AddressError:
                continue
            if fields.get("op") == "ban" and address not in self.ignore:
                adds[address] = int(fields.get("until", "0")) / 1000.0
                deletes.discard(address)
            elif fields.get("op") == "unban":
                deletes.add(address)
                adds.pop(address, None)
        if deletes:
            await self._firewall("delete", list(deletes))
            for address in deletes:
                self.applied.pop(address, None)
        if adds:
            await self._firewall("add", adds)
            self.applied.update(adds)
            self.applied_total += len(adds)
            log.info("applied %d bans: %s", len(adds), " ".join(map(str, list(adds)[:10])))

    async def expire(self) -> None:
        """Lift bans whose time is up, with or without Redis."""
        now = time.time()
        due = [address for address, until in self.applied.items() if until <= now]
        if due:
            await self._firewall("delete", due)
            for address in due:
                del self.applied[address]
            log.info("expired %d bans", len(due))

    async def heartbeat(self) -> None:
        if time.monotonic() < self._next_heartbeat:
            return
        self._next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        await self.store.heartbeat(
            {
                "backend": self.firewall.name,
                "applied": len(self.applied),
                "applied_total": self.applied_total,
            }
        )

    async def step(self) -> None:
        """One turn: resync if due, wait briefly for events, apply them, expire."""
        if time.monotonic() >= self._next_sync or await self._missed_events():
            await self.reconcile()
        events = await self.store.events_after(self.last_id, block_ms=self.block_ms)
        if events:
            await self.apply(events)
        elif self.block_ms is None:
            await asyncio.sleep(self.poll_interval)
        await self.expire()
        await self.heartbeat()

    def stop(self) -> None:
        """Stop applying; bans stay in the firewall. A flag as well as a cancel, since
        redis-py can swallow a cancellation that races with its own timeouts."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        self._task = asyncio.current_task()
        retry = 0.2
        try:
            while not self._stopping:
                try:
                    await self.step()
                    retry = 0.2
                except (StoreError, FirewallError) as error:
                    if self._stopping:
                        break
                    log.error("agent: %s; retrying in %.1fs", error, retry)
                    self._next_sync = 0.0  # after any gap, reconcile in full
                    try:
                        await self.expire()
                    except FirewallError as expire_error:
                        log.error("agent: local expiry failed: %s", expire_error)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, RETRY_MAX)
        finally:
            self._worker.shutdown(wait=False, cancel_futures=True)
