"""The shared store: counts, bans and ban events in Redis, one atomic script per step.

One job a module: base.py (constants, the small types, the client, scripts, event
stream and clock every part shares), core.py (the Store: the screening and
authentication steps, bans, holds, unbans), reads.py (what status, the page and export
read), feeds.py (blocklists in bulk and their batches), notify.py (webhook senders'
lease and cursor), client.py (the redis-py client, what a Redis says of itself).
"""

from __future__ import annotations

from fastagi.store.base import (
    ADMIN_HOLD,
    AUTH_HOLD,
    FEED_BATCH_KEEP,
    FEED_EVENTS_MAX,
    FEED_HOLD,
    HEARTBEAT_INTERVAL,
    MIN_REDIS,
    PRUNE_EVERY,
    STALE_BEATS,
    THRESHOLD_HOLD,
    Hold,
    Link,
    Policy,
    StoreError,
    Verdict,
    parse_event_id,
)
from fastagi.store.client import (
    RedisFacts,
    redis_client,
    version_tuple,
)
from fastagi.store.core import (
    Store,
)
from fastagi.store.reads import (
    heartbeat_age,
)

__all__ = [
    "ADMIN_HOLD",
    "AUTH_HOLD",
    "FEED_BATCH_KEEP",
    "FEED_EVENTS_MAX",
    "FEED_HOLD",
    "HEARTBEAT_INTERVAL",
    "MIN_REDIS",
    "PRUNE_EVERY",
    "STALE_BEATS",
    "THRESHOLD_HOLD",
    "Hold",
    "Link",
    "Policy",
    "RedisFacts",
    "Store",
    "StoreError",
    "Verdict",
    "heartbeat_age",
    "parse_event_id",
    "redis_client",
    "version_tuple",
]
