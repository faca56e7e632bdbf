"""Who may open a FastAGI session besides an `allowed_clients` address: the optional
shared key in the AGI URL, and how refusals are logged.

`allowed_clients` holds 127.0.0.1, so on the PBX itself any local user could screen
(and so ban) addresses of their choosing. With `server.key` set, Asterisk must call
`agi://127.0.0.1:4573/screen?key=...`: res_agi writes the URL's path and query as
`agi_network_script`, the second line of the environment, before any caller text,
so only the block's own second line is read (agi.py `Environment.script`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

REFUSAL_LOG_INTERVAL = 60.0  # seconds between two refusal lines of one reason


def key_matches(expected: str, script: str) -> bool:
    """True when no key is configured, or `script`'s query has exactly one `key`
    parameter equal to it. Compared as digests in constant time: neither the key
    nor its length leaks through timing."""
    if not expected:
        return True
    query = script.partition("?")[2]
    given = [
        value for name, _, value in (p.partition("=") for p in query.split("&")) if name == "key"
    ]
    if len(given) != 1:
        return False
    return hmac.compare_digest(
        hashlib.sha256(given[0].encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


def url_with_key(url: str, key: str) -> str:
    """`url` carrying `key` as Asterisk would send it, unless it names a key already
    (so `simulate --target` can still try a wrong or empty one)."""
    base, sep, query = url.partition("?")
    if not key or "key" in (p.partition("=")[0] for p in query.split("&") if sep):
        return url
    return f"{base}?{query}&key={key}" if query else f"{base}?key={key}"


class RefusalLog:
    """At most one warning per reason and interval: a local flood of refused
    connections must not flood the log (the refused metric counts every one)."""

    def __init__(self, log: logging.Logger, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def refused(self, reason: str, text: str) -> None:
        """`text`: the peer and why, e.g. `127.0.0.1:40112: wrong or missing key`."""
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._held[reason] = self._held.get(reason, 0) + 1
            return
        self._last[reason] = now
        held = self._held.pop(reason, 0)
        more = f" ({held} more refused since the last such line)" if held else ""
        self.log.warning("refused FastAGI connection from %s%s", text, more)
