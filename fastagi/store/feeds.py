"""Blocklist feeds in the store (fastagi/feeds.py): bulk holds in chunks, the batch a `sync`
event names for the agents, and each feed's claim and state."""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastagi.store.base import (
    EVENTS_MAXLEN,
    FEED_BATCH_KEEP,
    FEED_CHUNK,
    FEED_EVENTS_MAX,
    FEED_GROUP,
    SYNC_REREAD_MAX,
    StoreBase,
    as_text,
    parse_event_id,
)


class Feeds(StoreBase):
    """The Store's blocklist writes and reads."""

    async def feed_holds(
        self,
        targets: list[str],
        source: str,
        reason: str,
        until: float,
        chunk: int = FEED_CHUNK,
        pipelined: bool = True,
    ) -> tuple[int, int]:
        """Place `source`'s hold until `until` (unix s, Redis's clock) on every target, in
        chunks of one script each: (holds placed or lengthened, bans started). The
        caller filtered out protected targets. `pipelined`: every chunk in one round
        trip per FEED_GROUP chunks (a real Redis runs each script alone and serves other
        clients between them);
        False awaits each chunk (the embedded store runs scripts on this loop). A batch
        larger than FEED_EVENTS_MAX sends one `sync` event after it instead of one event
        per ban: agents then reconcile once, in one firewall transaction."""
        publish = len(targets) <= FEED_EVENTS_MAX
        k = self.keys
        token = "" if publish else secrets.token_hex(8)
        keep = 0 if publish else int(FEED_BATCH_KEEP * 1000)
        after = "" if publish else await self.last_event_id()  # where the write began
        calls = []
        for start in range(0, len(targets), chunk):
            part = targets[start : start + chunk]
            keys = [k.banned, k.events, k.stats, k.feed_batch(token)]
            for target in part:
                keys += [k.record(target), k.holds(target)]
            args: list[Any] = [self.pbx_id, EVENTS_MAXLEN, self.policy.history_ms, source]
            args += [reason, int(until * 1000), keep, *part]
            calls.append((keys, args))
        replies: list[Any] = []
        if pipelined:
            # a pipeline per few chunks: packing 100,000 entries at once would hold this
            # loop (the FastAGI sessions' too) for a second; between groups it serves them
            for start in range(0, len(calls), FEED_GROUP):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls[start : start + FEED_GROUP]:
                        await self._feed(keys=keys, args=args, client=pipe)
                    replies += await self._call("feed import", pipe.execute())
        else:
            for keys, args in calls:
                replies.append(await self._call("feed import", self._feed(keys=keys, args=args)))
        placed = sum(int(reply[0]) for reply in replies)
        started = sum(int(reply[1]) for reply in replies)
        if not publish and any(int(reply[2]) for reply in replies):
            fields = {"op": "sync", "source": source, "pbx_id": self.pbx_id, "count": placed}
            fields.update({"batch": token, "after": after})
            await self._call(
                "feed import",
                self.redis.xadd(k.events, fields, maxlen=EVENTS_MAXLEN, approximate=True),
            )
        return placed, started

    async def sync_batch(
        self, token: str, after: tuple[int, int], upto: str
    ) -> tuple[dict[str, str], dict[str, str | None]] | None:
        """The ban-list entries a bulk write changed, for the agent at that write's `sync`
        event `upto`: (target -> end in ms as written, target -> end in ms now or None
        when not banned now). None when they cannot be told (the batch expired or is
        garbled, or the events since the write began, `after`, were trimmed away or are
        too many): the agent reads the whole list then.

        An entry that an event during the write also changed is read again from the ban
        list (the second dict): that event may have come after the entry was written, and
        the newer state must win. Events after `upto` the agent applies next, as always."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(k.feed_batch(token))
            pipe.xrange(k.events, f"{after[0]}-{after[1]}", upto, count=SYNC_REREAD_MAX + 2)
            pipe.xrange(k.events, count=1)
            pipe.xlen(k.events)
            raw, during, first, length = await self._call("sync batch read", pipe.execute())
        if raw is None:
            return None
        parts = as_text(raw).split()
        # a stream shorter than its cap was never trimmed (trimming stops at the cap)
        oldest = parse_event_id(as_text(first[0][0])) if first else None
        kept = length < EVENTS_MAXLEN or bool(oldest and oldest <= after)
        if len(parts) % 2 or not kept or len(during) > SYNC_REREAD_MAX + 1:
            return None
        written = dict(zip(parts[::2], parts[1::2], strict=True))
        named = ({as_text(key): value for key, value in fields.items()} for _, fields in during)
        touched = {as_text(fields["ip"]) for fields in named if "ip" in fields}
        again = [target for target in touched if target in written]
        current: dict[str, str | None] = {}
        if again:
            scores = await self._call("sync batch read", self.redis.zmscore(k.banned, again))
            for target, score in zip(again, scores, strict=True):
                del written[target]
                current[target] = None if score is None else f"{int(score)}"
        return written, current

    async def feed_claim(self, name: str, period: float) -> bool:
        """Take this period's refresh of a feed for this PBX (SET NX, expiring after 90%
        of the period): False when another PBX of the cluster has it."""
        ttl_ms = max(1, int(period * 900))
        lock = self.redis.set(self.keys.feed_lock(name), self.pbx_id, nx=True, px=ttl_ms)
        return bool(await self._call("feed lock", lock))

    async def feed_release(self, name: str) -> None:
        """Let another PBX try this period's refresh (ours failed)."""
        await self._call("feed lock", self.redis.delete(self.keys.feed_lock(name)))

    async def set_feed_state(self, name: str, state: dict[str, Any]) -> None:
        """A feed's last refresh (when, entries, held until, error), for `status`."""
        await self._call("feed state", self.redis.hset(self.keys.feeds, name, json.dumps(state)))

    async def feed_states(self) -> dict[str, dict[str, Any]]:
        """Each feed's last refresh as recorded; an entry that is not a JSON object is
        left out."""
        raw = await self._call("feed state", self.redis.hgetall(self.keys.feeds))
        out = {}
        for name, value in raw.items():
            try:
                state = json.loads(as_text(value))
            except ValueError:
                continue
            if isinstance(state, dict):
                out[as_text(name)] = state
        return out
