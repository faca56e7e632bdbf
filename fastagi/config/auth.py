"""`[auth]`: password guessing, from Asterisk's AMI security events (auth.py watches
them): where the manager interface is, as whom, and which events count."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .values import ConfigError, Schema, boolean, parse_duration, string, string_list, whole


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = ""
    secret: str = field(default="", repr=False)
    secret_file: str = ""
    events: tuple[str, ...] = ()
    threshold: int = 5
    window: float = 600.0
    ban_time: float = 3600.0


def _host(value: Any) -> str:
    text = string(value).strip().strip("[]")
    if not text or any(c.isspace() or c in "/@" for c in text):
        raise ValueError(f"{value!r} is not a host name or address")
    return text


def _one_line(value: Any) -> str:
    """Text that goes into an AMI action: a CR or LF would forge lines to Asterisk."""
    text = string(value)
    if "\r" in text or "\n" in text or len(text) > 256:
        raise ValueError("CR or LF in the value, or longer than 256 characters")
    return text


def _auth_events(value: Any) -> tuple[str, ...]:
    from fastagi.ami import NEVER_COUNTED, SECURITY_EVENTS

    events = string_list(value)
    for name in events:
        if name in NEVER_COUNTED:
            raise ValueError(f"{name} is not a failure (it never counts)")
        if name not in SECURITY_EVENTS:
            raise ValueError(f"{name!r} is not an Asterisk security event")
    if not events:
        raise ValueError("expected at least one event name")
    return events


AUTH: Schema = {
    "enabled": (boolean, False),
    "host": (_host, "127.0.0.1"),
    "port": (whole(1, 65535), 5038),
    "username": (_one_line, ""),
    "secret": (_one_line, ""),
    "secret_file": (string, ""),
    "events": (
        _auth_events,
        ["ChallengeResponseFailed", "InvalidPassword", "InvalidAccountID", "FailedACL"],
    ),
    "threshold": (whole(1, 1_000_000), 5),
    "window": (parse_duration, "10m"),
    "ban_time": (parse_duration, "1h"),
}


def check_auth(auth: AuthConfig) -> None:
    """`[auth] enabled` needs a manager.conf user and exactly one way to its secret."""
    if not auth.username:
        raise ConfigError("auth.username: needed with auth.enabled = true (manager.conf user)")
    if bool(auth.secret) == bool(auth.secret_file):
        raise ConfigError("auth.secret: set either auth.secret or auth.secret_file, not both")
    if "$" not in os.path.expandvars(auth.secret_file):
        # Unreadable: a config error now, not at connect. A path naming a variable this
        # shell lacks (${CREDENTIALS_DIRECTORY} of the unit) is read by the service only.
        ami_secret(auth)


def ami_secret(auth: AuthConfig) -> str:
    """The AMI secret: `auth.secret`, or the first line of `auth.secret_file`, whose
    `${VARIABLES}` are expanded (`${CREDENTIALS_DIRECTORY}/ami-secret` for systemd's
    LoadCredential=)."""
    if not auth.secret_file:
        return auth.secret
    path = Path(os.path.expandvars(auth.secret_file))
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"auth.secret_file: cannot read {path} ({error})") from None
    try:
        return _one_line(secret)
    except ValueError as error:
        raise ConfigError(f"auth.secret_file: {error}") from None
