"""The redis-py client for every kind of deployment, and what a Redis says of itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry  # the asyncio one: the sync Retry never retries a coroutine
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException

from fastagi.config import RedisConfig
from fastagi.keys import Keys
from fastagi.redis_cluster import ClusterClient, cluster_client
from fastagi.store.base import POOL_SIZE, StoreError


def redis_client(
    config: RedisConfig, caller_deadlines: bool = False
) -> aioredis.Redis | ClusterClient:
    """A redis-py client for redis://, rediss://, unix://, Sentinel or Redis Cluster,
    with short timeouts.

    One retry only: a stale pooled connection after a Redis restart is replaced at
    once, while a Redis that is really down fails fast and the call fails open.
    `caller_deadlines`: no per-command socket timeout, because every caller bounds its
    own wait (the service: the screening step's budget, the metrics scrape's, startup's
    ping). redis-py's per-command timeout costs a task and a timer per command, ~45 us
    of a screened call's CPU in bench/; a cancelled command closes its connection.
    """
    options: dict[str, Any] = {
        "socket_timeout": None if caller_deadlines else config.timeout,
        "socket_connect_timeout": config.timeout,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
    }
    if config.cluster:
        try:
            return cluster_client(config.url, Keys(config.key_prefix).banned, **options)
        except RedisClusterException as error:
            raise StoreError(f"Redis Cluster client: {error}") from None
    if not config.sentinels:
        # Bounded, and waiting for a free connection rather than failing at the cap;
        # the caller's deadline (the screening step's budget) bounds that wait.
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url, max_connections=POOL_SIZE, timeout=None, **options
        )
        return aioredis.Redis(connection_pool=pool)
    hosts = []
    for entry in config.sentinels:
        host, _, port = entry.rpartition(":")
        hosts.append((host.strip("[]"), int(port)))
    sentinel = Sentinel(hosts, sentinel_kwargs={"socket_timeout": config.timeout}, **options)
    return sentinel.master_for(config.sentinel_service, **options)


@dataclass(frozen=True)
class RedisFacts:
    """What `check` and the startup check learn of the shared Redis. None: refused
    (a renamed command or an ACL), with Redis's own words in `refused`."""

    version: str | None
    appendonly: bool | None
    appendfsync: str | None
    save: str | None  # the RDB snapshot schedule ("" = none)
    refused: tuple[str, ...] = ()


def version_tuple(text: str) -> tuple[int, ...]:
    """ "7.0.15" -> (7, 0, 15), comparable with MIN_REDIS; a part without digits is 0."""
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
