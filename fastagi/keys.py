"""Every Redis key name, in one place.

All keys share one hash tag (`{screen}`) so each Lua script touches a single slot
and Redis Cluster accepts it; `key_prefix` keeps several deployments apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "fastagi:"

    @property
    def base(self) -> str:
        return f"{self.prefix}{{screen}}:"

    def count(self, ip: str) -> str:
        """Sorted set of this caller's calls in the window (score = ms time)."""
        return f"{self.base}count:{ip}"

    def record(self, ip: str) -> str:
        """Hash: until and reason (of the longest hold), since and pbx_id (of the last ban),
        bans (previous bans), count, first/last seen."""
        return f"{self.base}record:{ip}"

    def holds(self, target: str) -> str:
        """Hash: source -> "<end ms> <reason>", one hold per source of this target's ban
        (threshold, a fail2ban jail, an admin); expires with the longest."""
        return f"{self.base}holds:{target}"

    def per_address_prefixes(self) -> tuple[bytes, bytes, bytes]:
        """count(), record() and holds() up to the address, encoded once for the per-call
        step."""
        return self.count("").encode(), self.record("").encode(), self.holds("").encode()

    def inside(self, prefix: str) -> str:
        """Sorted set: the banned prefixes inside this wider one -> their ban ends (ms),
        for escalation (escalate.py)."""
        return f"{self.base}inside:{prefix}"

    @property
    def banned(self) -> str:
        """Sorted set: ip -> ban end (ms), the end of its longest hold. The ban list every
        agent reconciles to."""
        return f"{self.base}banned"

    @property
    def counted(self) -> str:
        """Sorted set: ip -> end of its current window (ms), for `status`."""
        return f"{self.base}counted"

    @property
    def events(self) -> str:
        """Stream of ban/unban events, capped; agents read it from their last id."""
        return f"{self.base}events"

    @property
    def stats(self) -> str:
        """Hash of cluster-wide totals (calls, bans, unbans, injections)."""
        return f"{self.base}stats"

    @property
    def bans_by_hour(self) -> str:
        """Hash: hour (unix ms // 3,600,000) -> bans counted in it, for the status page's
        chart (the events stream is capped and not saved, so it cannot tell). Hours older
        than two days leave it when a new hour starts (lua.py)."""
        return f"{self.base}bans-by-hour"

    @property
    def agents(self) -> str:
        """Hash: pbx_id -> JSON heartbeat of that PBX's agent."""
        return f"{self.base}agents"

    @property
    def epoch(self) -> str:
        """String: a token made once per life of the ban list. A Redis that lost its data
        (restarted without persistence, FLUSHALL) loses it too, while an unban keeps it,
        so agents tell "Redis was wiped" from "everything was unbanned"."""
        return f"{self.base}epoch"

    @property
    def embedded_state(self) -> str:
        """Hash, embedded store only: the state file (path), its last save (saved_at, ms)
        and the last save's error, for `check`. Not saved itself."""
        return f"{self.base}embedded-state"

    def persisted(self) -> tuple[tuple[str, str], ...]:
        """What the embedded store saves to disk, (name, Redis type); a trailing `*`:
        every key so named. The ban list, each ban's holds (so a fail2ban jail's unban
        still lifts only its own after a restart), the records (history, escalation) and
        the totals and bans per hour; counting windows, events and heartbeats are
        short-lived, start afresh."""
        return (
            (self.banned, "zset"),
            (self.holds("*"), "hash"),
            (self.record("*"), "hash"),
            (self.stats, "hash"),
            (self.bans_by_hour, "hash"),
        )

    def auth_count(self, ip: str) -> str:
        """Sorted set of this address's authentication failures in the `[auth]` window."""
        return f"{self.base}auth:count:{ip}"

    @property
    def auth_counted(self) -> str:
        """Sorted set: ip -> end of its current `[auth]` window (ms), for `status`."""
        return f"{self.base}auth:counted"

    @property
    def feeds(self) -> str:
        """Hash: feed name -> JSON of its last refresh (when, entries, held until, the
        last error), for `status` (feeds.py)."""
        return f"{self.base}feeds"

    def feed_lock(self, name: str) -> str:
        """String, expiring: the PBX refreshing this feed now, so a cluster fetches each
        feed once per refresh, not once per PBX."""
        return f"{self.base}feed-lock:{name}"

    def feed_batch(self, token: str) -> str:
        """String, expiring (store.FEED_BATCH_KEEP): the ban-list entries one bulk write
        changed, `<target> <end ms>` lines, named by its `sync` event, so an agent applies
        just those instead of reading and checking the whole list (agent.py)."""
        return f"{self.base}feed-batch:{token}"

    def notify_lease(self, hook: str) -> str:
        """String: the token of the one process sending this webhook's messages
        (notify.py), expiring unless renewed, so the cluster sends each message once."""
        return f"{self.base}notify:{hook}:lease"

    def notify_cursor(self, hook: str) -> str:
        """String: the id of the last event this webhook's receiver got; the next
        sender resumes after it."""
        return f"{self.base}notify:{hook}:cursor"
