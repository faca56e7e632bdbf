"""The ban agent: makes this host's firewall follow the shared ban list.

It reconciles at start, every `sync_interval` and after any gap (Redis unreachable,
events trimmed away), and applies ban/unban events as they arrive, so a ban reaches
every connected PBX within milliseconds; a bulk write (a blocklist) comes as one `sync`
event naming the batch of entries it changed, applied in one firewall transaction
without reading the whole list. Bans expire locally even while Redis is
unreachable (kernel timeouts where the backend has them, a local timer always).
Firewall calls block (libiptc, nft, ipset), so they run in one worker thread, never
on the loop that answers Asterisk. Stopping leaves the bans in place.

Everything read from Redis is another host's text: each event and ban-list entry is
validated (parse_event, parse_end), and one that cannot or must not be applied
(malformed, ignored; protect adds a reason to `checks`) is skipped, logged once and
counted, never fatal. Ban ends are in Redis's clock; the agent turns them into this
host's clock (the store's measured offset) before the firewall sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastagi import metrics
from fastagi.addresses import AddressError, AddressSet, IPNetwork, parse_target, target_text
from fastagi.firewall.base import Firewall, FirewallError
from fastagi.protect import Protected
from fastagi.store import (
    FEED_BATCH_KEEP,
    HEARTBEAT_INTERVAL,
    Store,
    StoreError,
    parse_event_id,
)

log = logging.getLogger("fastagi.agent")

RETRY_MAX = 5.0
FULL_EVERY = 10  # every 10th periodic sync rewrites the whole list anyway
EXPIRE_TICK = 0.5  # seconds between local expiry checks while Redis is away
UNTIL_TOLERANCE = 1.0  # seconds: a ban end that moved more than this is re-applied
EPOCH_EVERY = 1.0  # seconds between looks at the ban list's epoch token (one GET)


# -- what the agent accepts from Redis ---------------------------------------------------

MAX_SHOWN = 120  # characters of a skipped entry's text in its log line
MAX_END_MS = 253_402_300_799_999  # 9999-12-31: a later ban end is garbage, not a ban
SYNC_TOKEN = re.compile(r"[0-9a-f]{1,32}")  # a `sync` event's batch (store.feed_holds)
EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
# (reason label, why) for an entry the agent leaves out; the label goes into the metric
Skip = tuple[str, str]


class BadEntry(ValueError):
    """An event or ban-list entry that is not a ban or unban; the message says why."""


def shown(text: str) -> str:
    """Another host's text, fit for one log line: escaped and cut to MAX_SHOWN characters."""
    return repr(text[:MAX_SHOWN]) + ("..." if len(text) > MAX_SHOWN else "")


def parse_ban_target(text: str | None) -> IPNetwork:
    if text is None:
        raise BadEntry("no ip")
    try:
        return parse_target(text)
    except AddressError:
        raise BadEntry("not an IP address") from None


def parse_end(ms: float) -> float:
    """A ban end in milliseconds of Redis's clock (finite, positive, before year 10000);
    unix seconds."""
    if not (math.isfinite(ms) and 0 < ms <= MAX_END_MS):
        raise BadEntry("the ban end is not a time")
    return ms / 1000.0


def parse_event(fields: dict[str, str]) -> tuple[str, IPNetwork, float]:
    """(op, target, end in Redis's clock) of an event as lua.py writes it."""
    op = fields.get("op")
    if op not in ("ban", "unban"):
        raise BadEntry("unknown op" if op is not None else "no op")
    target = parse_ban_target(fields.get("ip"))
    if op == "unban":
        return op, target, 0.0
    until = fields.get("until")
    if until is None:
        raise BadEntry("no until")
    return op, target, parse_end(whole_ms(until))


def whole_ms(text: str) -> float:
    """A ban end as lua.py writes it: whole milliseconds, nothing else (`17e11` is some
    other writer's mistake)."""
    if not (text.isascii() and text.isdigit()):
        raise BadEntry("until is not whole milliseconds")
    return int(text) if len(text) <= 16 else math.inf


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a sync batch is sorted: 100,000 new networks
    made it walk every object again and again, half of the batch's 0.5 s; the loop
    makes no cycles, and the collector catches up after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _event_text(event_id: str, fields: dict[str, str]) -> str:
    return " ".join([event_id, *(f"{key}={value}" for key, value in fields.items())])


class Agent:
    def __init__(
        self,
        store: Store,
        firewall: Firewall,
        sync_interval: float,
        ignore: AddressSet,
        block_ms: int | None = 100,
        poll_interval: float = 0.05,
        protected: Protected | None = None,
    ) -> None:
        self.store = store
        self.firewall = firewall
        self.sync_interval = sync_interval
        self.ignore = ignore
        self.block_ms = block_ms  # None: the store cannot block (embedded); poll instead
        self.poll_interval = poll_interval
        # what we put in the firewall, with ends in this host's clock (as the firewall has them)
        self.applied: dict[IPNetwork, float] = {}
        # ban-list entries left out (text -> end in Redis's clock): counted as the list
        # counts them, and logged only when they first appear
        self.skipped: dict[str, float] = {}
        # why an entry may not be applied: each returns a Skip or None
        self.checks: list[Callable[[IPNetwork], Skip | None]] = [self._ignored]
        # this host's infrastructure is never banned here, whatever the list says
        self.protected = protected
        self._protected_generation = 0
        if protected is not None:
            self.checks.append(self._protected)
            self._protected_generation = protected.generation
        self.last_id = "0-0"
        self.applied_total = 0
        self._worker: ThreadPoolExecutor | None = None
        self._next_sync = 0.0
        self._syncs_since_full = 0
        self._full_due = True  # at start and after any gap: rewrite in full
        self._diff_due = False  # the periodic check found the list and firewall apart
        self._check: asyncio.Task | None = None
        self.full_reconciles = 0
        self._next_heartbeat = 0.0
        self._next_clock_sync = 0.0
        self._beat_due = False  # what the firewall holds changed: heartbeat now
        self._adopted = False
        self._stopping = False
        self._task: asyncio.Task | None = None
        self.epoch: str | None = None  # the ban list's epoch token as last seen (keys.py)
        self.written_back = 0  # bans this agent wrote back after Redis lost its data
        self._next_epoch_check = 0.0

    async def _firewall(self, method: str, *args: Any) -> Any:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="firewall")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, getattr(self.firewall, method), *args)

    # -- filtering: what this host applies of what it reads -------------------------------

    def _ignored(self, target: IPNetwork) -> Skip | None:
        return ("ignored", "in screening.ignore") if target in self.ignore else None

    def _protected(self, target: IPNetwork) -> Skip | None:
        why = self.protected.reason(target) if self.protected is not None else None
        return None if why is None else ("protected", why)

    def _protected_changed(self) -> bool:
        """The protected set changed (a host name re-resolved): filter the list anew."""
        if self.protected is None or self.protected.generation == self._protected_generation:
            return False
        self._protected_generation = self.protected.generation
        return True

    def _refused(self, target: IPNetwork) -> Skip | None:
        for check in self.checks:
            if (skip := check(target)) is not None:
                return skip
        return None

    def _skip(self, what: str, text: str, skip: Skip) -> None:
        """One line and one count per skipped entry; callers make sure it is once."""
        label, why = skip
        log.warning("agent: skipped %s %s: %s", what, shown(text), why)
        metrics.entry_skipped(self.store.pbx_id, label)

    def _newly_skipped(self, text: str) -> bool:
        """Not already left out as a running entry (so not logged yet)."""
        return self.skipped.get(text, 0.0) <= self.store.now()

    def _local(self, until: float) -> float:
        """A ban end in Redis's clock as this host's clock (and the firewall) counts it."""
        return until - self.store.clock_offset

    def _wanted(self, bans: dict[str, float]) -> dict[IPNetwork, float]:
        """The ban list as this host applies it (ends in its own clock). The entries left
        out are remembered with their ends, so the periodic count compares like with
        like, and logged when they first appear, not at every read."""
        wanted: dict[IPNetwork, float] = {}
        skipped: dict[str, float] = {}
        for text, until in bans.items():
            try:
                target, end = parse_ban_target(text), parse_end(until * 1000)
                if target in wanted:
                    raise BadEntry("a second entry for the same address")
                skip = self._refused(target)
            except BadEntry as error:
                skip = ("malformed", str(error))
            if skip is None:
                wanted[target] = self._local(end)
                continue
            if self._newly_skipped(text):
                self._skip("ban-list entry", f"{text} until {until * 1000:.0f}", skip)
            skipped[text] = until
        self.skipped = skipped
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
        if full:
            await self.store.sync_clock()
        last_id = await self.store.last_event_id()
        await self._heal_if_wiped()
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
            self._beat_due = True
        self._next_sync = time.monotonic() + self.sync_interval
        log.log(
            logging.INFO if full else logging.DEBUG,
            "reconciled (%s): %d bans on %s",
            "full" if full else ("difference" if wanted is not None else "checked"),
            len(self.applied),
            self.firewall.name,
        )

    async def _count_matches(self) -> bool:
        """The ban list holds as many running entries as we applied plus those we left
        out (one ZCOUNT): with the event stream unbroken (_missed_events), nothing to
        read then."""
        count = await self.store.banned_count()
        redis_now = self.store.now()
        left_out = sum(1 for until in self.skipped.values() if until > redis_now)
        return count == self._live_count() + left_out

    def _live_count(self) -> int:
        now = self.store.clock()
        return sum(1 for until in self.applied.values() if until > now)

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
        return first is not None and parse_event_id(first) > parse_event_id(self.last_id)

    async def apply(self, events: list[tuple[str, dict[str, str]]]) -> None:
        """Apply a batch of events in order: the ban/unban events between two `sync`
        events collapsed to one add and one delete, each `sync` event's batch in one."""
        run: list[tuple[str, dict[str, str]]] = []
        for event in events:
            if event[1].get("op") == "sync":
                await self._apply_events(run)
                run = []
                await self._apply_sync(*event)
            else:
                run.append(event)
        await self._apply_events(run)

    async def _apply_events(self, events: list[tuple[str, dict[str, str]]]) -> None:
        adds: dict[IPNetwork, float] = {}
        deletes: set[IPNetwork] = set()
        for event_id, fields in events:
            self.last_id = event_id
            try:
                op, target, until = parse_event(fields)
            except BadEntry as error:
                self._skip("event", _event_text(event_id, fields), ("malformed", str(error)))
                continue
            until = None if op == "unban" else until
            if (skip := self._sort(fields["ip"], target, until, adds, deletes)) is not None:
                self._skip("event", _event_text(event_id, fields), skip)
        await self._change(adds, deletes)

    def _sort(
        self,
        text: str,
        target: IPNetwork,
        until: float | None,
        adds: dict[IPNetwork, float],
        deletes: set[IPNetwork],
    ) -> Skip | None:
        """One entry (an event, a sync batch's) into adds or deletes: `until` None lifts
        it; a protected or ignored target is left out, and why is returned the first time
        (while it runs) for the caller's one log line."""
        if until is None:
            deletes.add(target)
            adds.pop(target, None)
            self.skipped.pop(text, None)
            return None
        if (skip := self._refused(target)) is not None:
            newly = self._newly_skipped(text)
            self.skipped[text] = until
            return skip if newly else None
        adds[target] = self._local(until)
        deletes.discard(target)
        return None

    async def _change(self, adds: dict[IPNetwork, float], deletes: set[IPNetwork]) -> None:
        """One delete and one add call (one transaction each), and the books after them."""
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
        self._beat_due = self._beat_due or bool(adds or deletes)

    async def _apply_sync(self, event_id: str, fields: dict[str, str]) -> None:
        """A bulk change (a blocklist of 100,000) came as one `sync` event instead of an
        event per ban. It names the batch of ban-list entries the write changed: those
        are applied, checked as events are, in one firewall transaction. Without a
        readable batch (an older writer, expired, the events since the write began
        gone), the whole list is read at the next step instead."""
        self.last_id = event_id
        if self._full_due:
            return  # the whole list is read next anyway
        token, after = fields.get("batch", ""), fields.get("after", "")
        batch = None
        if SYNC_TOKEN.fullmatch(token) and EVENT_ID.fullmatch(after):
            batch = await self.store.sync_batch(token, parse_event_id(after), event_id)
        if batch is None:
            log.info("sync event %s: its batch cannot be read; reading the whole list", event_id)
            self._full_due = True
            return
        written, current = batch
        adds: dict[IPNetwork, float] = {}
        deletes: set[IPNetwork] = set()
        now = self.store.now()
        with _collector_paused():
            self._sort_batch(written, current, now, adds, deletes)
        await self._change(adds, deletes)

    def _sort_batch(
        self,
        written: dict[str, str],
        current: dict[str, str | None],
        now: float,
        adds: dict[IPNetwork, float],
        deletes: set[IPNetwork],
    ) -> None:
        """A sync batch's entries into adds and deletes, each checked as an event is."""
        for text, end in itertools.chain(written.items(), current.items()):
            try:
                target = parse_ban_target(text)
                until = None if end is None else parse_end(whole_ms(end))
            except BadEntry as error:
                if self._newly_skipped(text):
                    self._skip("sync batch entry", f"{text} until {end}", ("malformed", str(error)))
                self.skipped[text] = now + FEED_BATCH_KEEP  # the next full read says more
                continue
            if until is not None and until <= now:
                continue  # ended already: as a read of the list leaves it out
            held = self.applied.get(target)
            # a written entry may be older than what another writer's event or batch gave
            # this agent since: it never shortens a ban; an entry read again (`current`)
            # is the list as it is now, and wins
            if (
                until is not None
                and text not in current
                and held is not None
                and self._local(until) - held <= UNTIL_TOLERANCE
            ):
                continue
            if (skip := self._sort(text, target, until, adds, deletes)) is not None:
                self._skip("sync batch entry", f"{text} until {end}", skip)

    def _report(self, applied: int = 0, lifted: int = 0) -> None:
        """Feed /metrics (a no-op when metrics are off)."""
        pbx, backend = self.store.pbx_id, self.firewall.name
        if applied:
            metrics.ban_applied(pbx, backend, applied)
        if lifted:
            metrics.ban_lifted(pbx, backend, lifted)
        metrics.firewall_size(pbx, backend, len(self.applied))

    async def expire(self) -> None:
        """Lift bans whose time is up, with or without Redis (this host's clock: the
        ends were turned into it when applied)."""
        now = self.store.clock()
        due = [address for address, until in self.applied.items() if until <= now]
        if due:
            await self._firewall("delete", due)
            for address in due:
                del self.applied[address]
            log.info("expired %d bans", len(due))
            self._report(lifted=len(due))
            self._beat_due = True

    async def heartbeat(self) -> None:
        """Every HEARTBEAT_INTERVAL, and at once when the firewall changed, so `status`
        shows the count as of the last apply. Redis's clock offset is refreshed with
        the periodic beat."""
        now = time.monotonic()
        if now < self._next_heartbeat and not self._beat_due:
            return
        if now >= self._next_clock_sync:
            await self.store.sync_clock()
            self._next_clock_sync = now + HEARTBEAT_INTERVAL
        self._next_heartbeat = now + HEARTBEAT_INTERVAL
        self._beat_due = False
        await self.store.heartbeat(
            {
                "backend": self.firewall.name,
                "applied": self._live_count(),
                "applied_total": self.applied_total,
                "interval": HEARTBEAT_INTERVAL,
            }
        )

    async def _adopt_firewall(self) -> None:
        """At start, take over the bans the firewall already holds with a known end
        (iptables keeps it in each rule's comment; kernel-timeout backends report it),
        so they are lifted on time even when Redis is unreachable now. The first
        reconcile with Redis replaces them all."""
        self._adopted = True
        try:
            await self._firewall("setup")
            held = await self._firewall("list")
        except FirewallError as error:
            log.warning("agent: cannot read what %s holds: %s", self.firewall.name, error)
            return
        known = {
            parse_target(str(target)): until
            for target, until in held.items()
            if until is not None and math.isfinite(until)
        }
        if known and not self.applied:
            self.applied = known
            log.info("%s holds %d bans with known ends", self.firewall.name, len(known))

    async def step(self) -> None:
        """One turn: resync if due, wait briefly for events, apply them, expire."""
        # the embedded store says at no cost whether anything came: no command then
        quiet = self.block_ms is None and self.store.nothing_after(self.last_id)
        if (
            self._full_due
            or self._protected_changed()
            or (not quiet and await self._missed_events())
        ):
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
        await self._epoch_check_due()
        events = [] if quiet else await self.store.events_after(self.last_id, self.block_ms)
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
        except Exception as error:  # a bug must not end the checks in silence
            log.error("agent: periodic check failed: %s: %s", type(error).__name__, error)
            self._full_due = True
        finally:
            self._check = None

    # -- a Redis that lost its data -------------------------------------------------------

    async def _epoch_check_due(self) -> None:
        """A FLUSHALL breaks no connection and sends no event: look at the token every
        EPOCH_EVERY (at most sync_interval) seconds, so the cluster heals well within
        sync_interval."""
        if time.monotonic() >= self._next_epoch_check:
            self._next_epoch_check = time.monotonic() + min(EPOCH_EVERY, self.sync_interval)
            await self._heal_if_wiped()

    async def _heal_if_wiped(self) -> None:
        """Before the ban list is read: if its epoch token is gone or changed, Redis lost
        its data (restarted without persistence, FLUSHALL), not "everything was
        unbanned" (an unban keeps the token). Then this agent keeps what it applied and
        writes it back, so the cluster heals instead of lifting every ban everywhere."""
        current = await self.store.epoch()
        if current is not None and current == self.epoch:
            return
        if current is not None and self.epoch is None:
            self.epoch = current  # first look: this is the list we follow
            return
        now = time.time()  # applied ends are on this host's clock (_local)
        running = {
            target_text(a): until + self.store.clock_offset  # back on Redis's clock
            for a, until in self.applied.items()
            if math.isfinite(until) and until > now
        }
        if self.epoch is not None:
            log.warning(
                "Redis lost its data (the ban list's epoch token is %s): writing back the "
                "%d running bans this agent applied",
                "gone" if current is None else "new",
                len(running),
            )
        self.epoch, written = await self.store.restore_bans(running, secrets.token_hex(8))
        self.written_back += written
        if running:
            log.info("wrote back %d bans (the others were there already)", written)

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

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Stop applying; bans stay in the firewall. A flag as well as a cancel, since
        redis-py can swallow a cancellation that races with its own timeouts."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        """Until stopped; may be run again after it raised (service.supervised)."""
        self._task = asyncio.current_task()
        self._full_due = True
        if not self._adopted:
            await self._adopt_firewall()
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
            if self._worker is not None:
                self._worker.shutdown(wait=False, cancel_futures=True)
                self._worker = None
