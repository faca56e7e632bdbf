"""`[redis]`: the shared store (embedded, one Redis, Sentinel or Cluster) and how long
a call may wait on it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.connection import parse_url

from .values import ConfigError, Schema, boolean, parse_duration, string, string_list, whole


@dataclass(frozen=True)
class RedisConfig:
    url: str
    key_prefix: str
    timeout: float
    sentinels: tuple[str, ...]
    sentinel_service: str
    wait_replicas: int = 0
    wait_timeout: float = 0.1
    cluster: bool = False


def redacted(url: str) -> str:
    """The URL without its password (before the host, or redis-py's `?password=`), for
    logs, status and the status page."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    try:
        parts = urlsplit(url)
    except ValueError:  # unbalanced brackets: no password to find
        return url
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def _redis_url(value: Any) -> str:
    """A URL redis-py will take as it is: checked here, or it fails later with a
    traceback (a bad port) or silently (a database that is not a number means 0)."""
    url = string(value)
    if not url.startswith(("memory://", "redis://", "rediss://", "unix://")):
        raise ValueError(f"{url!r}: use memory://, redis://, rediss:// or unix://")
    if url.startswith("memory://"):
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
        parse_url(url)
    except ValueError as error:
        raise ValueError(f"{redacted(url)!r}: {error}") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{redacted(url)!r}: no socket path (unix:///run/redis.sock)")
        return url
    if not parts.hostname:
        raise ValueError(f"{redacted(url)!r}: no host (redis://HOST[:PORT][/DB])")
    database = parts.path.strip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError(f"{redacted(url)!r}: database {database!r} is not a number")
    return url


def _sentinels(value: Any) -> tuple[str, ...]:
    """Sentinel addresses, each HOST:PORT (an entry without a port would only fail
    later, inside redis-py, with a traceback)."""
    entries = string_list(value)
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not HOST:PORT")
    return entries


REDIS: Schema = {
    "url": (_redis_url, "memory://"),
    "key_prefix": (string, "fastagi:"),
    "timeout": (parse_duration, "250ms"),
    "sentinels": (_sentinels, []),
    "sentinel_service": (string, "mymaster"),
    # Durability across a failover: after a step that bans, WAIT for this many
    # replicas to have the ban (0: do not wait), at most wait_timeout.
    "wait_replicas": (whole(0, 100), 0),
    "wait_timeout": (parse_duration, "100ms"),
    # Redis Cluster: `url` is any one node (a seed); the client follows the slot map.
    "cluster": (boolean, False),
}


def check_cluster(redis: RedisConfig) -> None:
    """`cluster = true` with what a Redis Cluster client cannot do: refused at load."""
    if not redis.url.startswith(("redis://", "rediss://")):
        scheme = redis.url.partition("://")[0]
        raise ConfigError(
            f"redis.cluster: needs a redis:// or rediss:// url of a cluster node, not {scheme}://"
        )
    if redis.sentinels:
        raise ConfigError(
            "redis.cluster: a Redis Cluster has no Sentinel; set sentinels = [] or cluster = false"
        )
    if redis.wait_replicas:
        raise ConfigError(
            "redis.wait_replicas: must be 0 with redis.cluster = true "
            "(WAIT is not supported through the cluster client)"
        )
    database = urlsplit(redis.url).path.strip("/")
    if database not in ("", "0"):
        raise ConfigError(f"redis.url: a Redis Cluster has database 0 only, not /{database}")
