"""`[server]`: the FastAGI listener, who may talk to it, and the URL key it asks for."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastagi.addresses import AddressSet

from .values import ConfigError, Schema, host_port, networks, parse_duration, string, whole


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, int]
    allowed_clients: AddressSet
    max_sessions: int
    session_timeout: float
    runtime_dir: str
    key: str = field(default="", repr=False)  # from `key` or `key_file`; never shown
    key_file: str = ""
    state_dir: str = ""


KEY_CHARACTERS = re.compile(r"[A-Za-z0-9._~-]{16,256}")


def parse_key(value: Any) -> str:
    """The shared secret of the AGI URL (`?key=...`): URL-safe characters, so Asterisk
    passes it verbatim and no comma splits AGI()'s arguments. Never echoed in an error."""
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if value and not KEY_CHARACTERS.fullmatch(value):
        raise ValueError(
            "16 to 256 of the characters A-Z a-z 0-9 . _ ~ - (e.g. openssl rand -hex 32)"
        )
    return value


def read_key_file(path: str) -> str:
    """The key from a file owned by root or us that no other local user may read (a key
    they can read or write proves nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if info.st_mode & 0o007:
            raise ValueError(f"{path}: other users may read it (chmod 0600 or 0640)")
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o020:
            raise ValueError(f"{path}: another user may write it (owner root or us, no g+w)")
        text = file.read(1024).decode("ascii", errors="replace").strip()
    if not text:
        raise ValueError(f"{path}: empty")
    try:
        return parse_key(text)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def with_key_file(server: ServerConfig, environ: Mapping[str, str]) -> ServerConfig:
    """`server.key_file` read into `key` (the only way the rest of the service sees it);
    errors name the setting the file came from."""
    origin = "FASTAGI_SERVER_KEY_FILE" if "FASTAGI_SERVER_KEY_FILE" in environ else ""
    origin = origin or "server.key_file"
    if server.key:
        raise ConfigError(f"{origin}: set either server.key or server.key_file, not both")
    try:
        key = read_key_file(server.key_file)
    except ValueError as error:
        raise ConfigError(f"{origin}: {error}") from None
    return replace(server, key=key)


def _absolute_or_empty(value: Any) -> str:
    text = string(value)
    if text and not Path(text).is_absolute():
        raise ValueError(f"{text!r} is not an absolute path")
    return text


SERVER: Schema = {
    "listen": (host_port, "127.0.0.1:4573"),
    "allowed_clients": (networks, ["127.0.0.1/32", "::1/128"]),
    "max_sessions": (whole(1, 1_000_000), 256),
    "session_timeout": (parse_duration, "5s"),
    "runtime_dir": (string, ""),
    # Optional shared secret Asterisk sends in the AGI URL (agi://.../screen?key=...),
    # or the file holding it; empty: none.
    "key": (parse_key, ""),
    "key_file": (string, ""),
    # where the embedded (memory://) store keeps its bans across restarts
    "state_dir": (_absolute_or_empty, ""),
}
