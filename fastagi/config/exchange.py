"""What the ban list trades with other systems: `[intel]` blocklists in (feeds.py),
`[export]` pages out (export.py) and `[notify]` webhooks on ban and unban (notify.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .values import Schema, boolean, bounded_duration, choice, string, whole


@dataclass(frozen=True)
class IntelConfig:
    feed: tuple[Any, ...] = ()  # feeds.FeedSpec, one per [[intel.feed]]


@dataclass(frozen=True)
class ExportConfig:
    pages: bool = True
    max_entries: int = 1_000_000
    refresh: float = 5.0


WEBHOOK_FORMATS = ("generic", "slack")
_WEBHOOK_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class WebhookConfig:
    """One `[[notify.webhook]]`: where ban and unban events go (notify.py)."""

    url: str = field(repr=False)  # may carry the receiver's token (Slack, Mattermost)
    name: str
    format: str = "generic"
    batch: float = 60.0
    timeout: float = 10.0
    retries: int = 5
    queue: int = 10_000


@dataclass(frozen=True)
class NotifyConfig:
    webhook: tuple[WebhookConfig, ...] = ()


def _feeds(value: Any) -> tuple[Any, ...]:
    """`[[intel.feed]]` entries (feeds.py reads them)."""
    from fastagi.feeds import parse_feeds

    return parse_feeds(value)


def _webhook_url(value: Any) -> str:
    """http(s)://host[:port]/path; errors name the scheme and host only, never the
    path or query, which may hold the receiver's token."""
    url = string(value)
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("white space or control characters in the URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        raise ValueError("not a URL (http://HOST[:PORT]/PATH or https://...)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{parts.scheme or '?'}://{parts.hostname or ''}: use http:// or https://")
    if parts.username or parts.password:
        raise ValueError(f"{parts.hostname}: user:password@ in the URL is not supported")
    return url


# key -> (parser, default) of one [[notify.webhook]] entry
WEBHOOK_SCHEMA: Schema = {
    "url": (_webhook_url, None),
    "name": (string, ""),
    "format": (lambda v: choice(v, WEBHOOK_FORMATS), "generic"),
    "batch": (lambda v: bounded_duration(v, 0.1, 86400), "60s"),
    "timeout": (lambda v: bounded_duration(v, 0.1, 300), "10s"),
    "retries": (whole(0, 100), 5),
    "queue": (whole(1, 1_000_000), 10_000),
}


def _webhooks(value: Any) -> tuple[WebhookConfig, ...]:
    """`[[notify.webhook]]` entries (an array of tables); names default to webhook-N."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("expected [[notify.webhook]] tables")
    hooks: list[WebhookConfig] = []
    for n, entry in enumerate(value, 1):
        values: dict[str, Any] = {}
        for key in entry:
            if key not in WEBHOOK_SCHEMA:
                raise ValueError(
                    f"entry {n}: {key}: unknown key (known: {', '.join(WEBHOOK_SCHEMA)})"
                )
        for key, (parse, default) in WEBHOOK_SCHEMA.items():
            if key not in entry and default is None:
                raise ValueError(f"entry {n}: {key}: missing")
            try:
                values[key] = parse(entry.get(key, default))
            except (ValueError, TypeError) as error:
                raise ValueError(f"entry {n}: {key}: {error}") from None
        values["name"] = values["name"] or f"webhook-{n}"
        if not _WEBHOOK_NAME.fullmatch(values["name"]):
            raise ValueError(f"entry {n}: name: letters, digits, . _ -, at most 64 characters")
        if any(hook.name == values["name"] for hook in hooks):
            raise ValueError(f"entry {n}: name: {values['name']!r} is used twice")
        hooks.append(WebhookConfig(**values))
    return tuple(hooks)


# The ban list out (export.py): /banlist.txt, /banlist.json and
# /banlist.crowdsec.json on the metrics listener, `fastagi-ctl export`.
EXPORT: Schema = {
    "pages": (boolean, True),
    "max_entries": (whole(1, 5_000_000), 1_000_000),
    "refresh": (lambda v: bounded_duration(v, 0.001, 3600), "5s"),
}
# Webhooks on ban and unban (notify.py): [[notify.webhook]] url = ..., format, ...
NOTIFY: Schema = {
    "webhook": (_webhooks, []),
}
# Blocklists in (feeds.py): [[intel.feed]] name, url or file, format, refresh, timeout.
INTEL: Schema = {
    "feed": (_feeds, []),
}
