"""Who may open a FastAGI session besides an `allowed_clients` address: the optional
shared key in the AGI URL.

`allowed_clients` holds 127.0.0.1, so on the PBX itself any local user could screen
(and so ban) addresses of their choosing. With `server.key` set, Asterisk must call
`agi://127.0.0.1:4573/screen?key=...`: res_agi writes the URL's path and query as
`agi_network_script`, the second line of the environment, before any caller text,
so only the block's own second line is read (agi.py `Environment.script`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac


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
    return hmac.compare_digest(hashlib.sha256(given[0].encode()).digest(), _digest(expected))


@functools.lru_cache(maxsize=4)
def _digest(key: str) -> bytes:
    """The configured key's digest, made once, not once per session."""
    return hashlib.sha256(key.encode()).digest()


def url_with_key(url: str, key: str) -> str:
    """`url` carrying `key` as Asterisk would send it, unless it names a key already
    (so `simulate --target` can still try a wrong or empty one)."""
    base, sep, query = url.partition("?")
    if not key or "key" in (p.partition("=")[0] for p in query.split("&") if sep):
        return url
    return f"{base}?{query}&key={key}" if query else f"{base}?key={key}"
