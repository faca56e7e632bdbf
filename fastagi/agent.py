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

from fastagi import metrics
from fastagi.addresses import AddressError, AddressSet, IPNetwork, parse_target, target_text
from fastagi.firewall.base import Firewall, FirewallError
from fastagi.store import Store, StoreError

log = logging.getLogger("fastagi.agent")

HEARTBEAT_INTERVAL = 5.0
RETRY_MAX = 5.0
FULL_EVERY = 10  # every 10th periodic sync rewrites the whole list anyway
EXPIRE_TICK = 0.5  # seconds between local expiry checks while Redis is away
UNTIL_TOLERANCE = 1.0  # seconds: a ban end that moved more than this is re-applied


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
        self.applied: dict[IPNetwork, float] = {}  # what we put in the firewall, with ends
        self.last_id = "0-0"
        self.applied_total = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="firewall")
        self._next_sync = 0.0
        self._syncs_since_full = 0
        self._full_due = True  # at start and after any gap: rewrite in full
        self._diff_due = False  # the periodic check found the list and firewall apart
        self._check: asyncio.Task | None = None
        self.full_reconciles = 0
        self._next_heartbeat = 0.0
        self._stopping = False
        self._task: asyncio.Task | None = None

    async def _firewall(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, getattr(self.firewall, method), *args)

    def _wanted(self, bans: dict[str, float]) -> dict[IPNetwork, float]:
        wanted = {}
        for text, until in bans.items():
            try:
                address = parse_target(text)
            except AddressError:
                log.error("ignoring a malformed address on the ban list: %r", text[:64])
                continue
            if address in self.ignore:
                log.warning("not banning %s: it is in screening.ignore", address)
                continue
            wanted[address] = until
        return wanted

    async def reconcile(self, full: bool = True) -> None:
        """Make the firewall equal the ban list; also restores a flushed chain/table.

        A full reconcile reads the whole list and rewrites it (set()): at start, after
        any gap, when the backend finds our chain/table/set damaged, and every
        FULL_EVERY syncs for a backend whose intact() cannot see the entries (nftables).
        The periodic one is cheap at any size: setup() (restores our chain/hooks), the
        backend's intact() check, and one ZCOUNT; only when the count differs from what
        this agent applied is the list read and the difference added or deleted.
        """
        last_id = await self.store.last_event_id()
        if not full and self._syncs_since_full + 1 >= FULL_EVERY:
            full = not getattr(self.firewall, "intact_sees_entries", False)
        if not full and not await self._intact():
            log.warning(
                "%s: our chain/table/set was changed behind our back; restoring", self.firewall.name
            )
            full = True
        wanted: dict[IPNetwork, float] | None = None
        if full or not await self._count_matches():
            wanted = self._wanted(await self.store.banned())
        await self._firewall("setup")
        if full and wanted is not None:
            await self._firewall("set", wanted)
            self._syncs_since_full = 0
            self.full_reconciles += 1
        else:
            if wanted is not None:
                await self._apply_difference(wanted)
            self._syncs_since_full += 1
        if wanted is not None:
            self.applied = wanted
            self.last_id = last_id  # events after it are applied (again) next
            self._report()
        self._next_sync = time.monotonic() + self.sync_interval
        log.log(
            logging.INFO if full else logging.DEBUG,
            "reconciled (%s): %d bans on %s",
            "full" if full else ("difference" if wanted is not None else "checked"),
            len(self.applied),
            self.firewall.name,
        )

    async def _count_matches(self) -> bool:
        """The ban list holds as many running bans as we applied (one ZCOUNT): with the
        event stream unbroken (_missed_events), nothing to read then."""
        now = time.time()
        count = await self.store.banned_count()
        return count == sum(1 for until in self.applied.values() if until > now)

    async def _intact(self) -> bool:
        check = getattr(self.firewall, "intact", None)
        if check is None:
            return False  # a backend without the cheap check: always rewrite in full
        try:
            return bool(await self._firewall("intact", dict(self.applied)))
        except FirewallError as error:
            log.warning("%s: intact check failed (%s)", self.firewall.name, error)
            return False

    async def _apply_difference(self, wanted: dict[IPNetwork, float]) -> None:
        gone = [address for address in self.applied if address not in wanted]
        new = {
            address: until
            for address, until in wanted.items()
            if address not in self.applied or abs(self.applied[address] - until) > UNTIL_TOLERANCE
        }
        if gone:
            await self._firewall("delete", gone)
        if new:
            await self._firewall("add", new)
        if gone or new:
            log.info("resync: %d bans added, %d lifted (events missed)", len(new), len(gone))

    async def _missed_events(self) -> bool:
        if self.last_id == "0-0":
            return False
        first = await self.store.first_event_id()
        return first is not None and _event_id(first) > _event_id(self.last_id)

    async def apply(self, events: list[tuple[str, dict[str, str]]]) -> None:
        """Apply a batch of events in order, collapsing them to one add and one delete."""
        adds: dict[IPNetwork, float] = {}
        deletes: set[IPNetwork] = set()
        for event_id, fields in events:
            self.last_id = event_id
            try:
                address = parse_target(fields.get("ip", ""))
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
            log.info("applied %d bans: %s", len(adds), " ".join(map(target_text, list(adds)[:10])))
        self._report(applied=len(adds), lifted=len(deletes))

    def _report(self, applied: int = 0, lifted: int = 0) -> None:
        """Feed /metrics (a no-op when metrics are off)."""
        pbx, backend = self.store.pbx_id, self.firewall.name
        if applied:
            metrics.ban_applied(pbx, backend, applied)
        if lifted:
            metrics.ban_lifted(pbx, backend, lifted)
        metrics.firewall_size(pbx, backend, len(self.applied))

    async def expire(self) -> None:
        """Lift bans whose time is up, with or without Redis."""
        now = time.time()
        due = [address for address, until in self.applied.items() if until <= now]
        if due:
            await self._firewall("delete", due)
            for address in due:
                del self.applied[address]
            log.info("expired %d bans", len(due))
            self._report(lifted=len(due))

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
        if self._full_due or await self._missed_events():
            await self.reconcile(full=True)
            self._full_due = False
        elif self._diff_due:
            self._diff_due = False
            await self.reconcile(full=False)
        elif time.monotonic() >= self._next_sync and self._check is None:
            # the periodic check runs beside the event loop below, so a ban arriving
            # meanwhile waits for one firewall call at most, not for the whole check
            self._next_sync = time.monotonic() + self.sync_interval
            self._check = asyncio.create_task(self._periodic_check())
        events = await self.store.events_after(self.last_id, block_ms=self.block_ms)
        if events:
            await self.apply(events)
        elif self.block_ms is None:
            await asyncio.sleep(self.poll_interval)
        await self.expire()
        await self.heartbeat()

    async def _periodic_check(self) -> None:
        """Every sync_interval: setup() (restores our chain/hooks), the backend's cheap
        intact() check and one ZCOUNT. Anything off makes the main loop reconcile."""
        try:
            if self._syncs_since_full + 1 >= FULL_EVERY and not getattr(
                self.firewall, "intact_sees_entries", False
            ):
                self._full_due = True
                return
            intact = await self._intact()
            await self._firewall("setup")
            if not intact:
                log.warning(
                    "%s: our chain/table/set was changed behind our back; restoring",
                    self.firewall.name,
                )
                self._full_due = True
            elif not await self._count_matches():
                self._diff_due = True
            else:
                self._syncs_since_full += 1
        except (StoreError, FirewallError) as error:
            log.error("agent: periodic check: %s", error)
            self._full_due = True
        finally:
            self._check = None

    async def _wait_expiring(self, seconds: float) -> None:
        """Wait before a retry, lifting due bans meanwhile: with Redis away for minutes,
        a ban still ends on time (within EXPIRE_TICK), not at the next retry."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            try:
                await self.expire()
            except FirewallError as error:
                log.error("agent: local expiry failed: %s", error)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, EXPIRE_TICK))

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
                    self._full_due = True  # after any gap, reconcile in full
                    await self._wait_expiring(retry)
                    retry = min(retry * 2, RETRY_MAX)
        finally:
            if self._check is not None:
                self._check.cancel()
                await asyncio.gather(self._check, return_exceptions=True)
            self._worker.shutdown(wait=False, cancel_futures=True)
