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
        """Hash: until, since, reason, pbx_id, bans (previous bans), count, first/last seen."""
        return f"{self.base}record:{ip}"

    def per_address_prefixes(self) -> tuple[bytes, bytes]:
        """count() and record() up to the address, encoded once for the per-call step."""
        return self.count("").encode(), self.record("").encode()

    @property
    def banned(self) -> str:
        """Sorted set: ip -> ban end (ms). The ban list every agent reconciles to."""
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
    def agents(self) -> str:
        """Hash: pbx_id -> JSON heartbeat of that PBX's agent."""
        return f"{self.base}agents"

    def auth_count(self, ip: str) -> str:
        """Sorted set of this address's authentication failures in the `[auth]` window."""
        return f"{self.base}auth:count:{ip}"

    @property
    def auth_counted(self) -> str:
        """Sorted set: ip -> end of its current `[auth]` window (ms), for `status`."""
        return f"{self.base}auth:counted"
