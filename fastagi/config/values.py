"""The value parsers every section uses: durations, bounded numbers, strings, lists.

Each parser takes what TOML (or an environment override) gave and returns the checked
value, or raises ValueError with the problem; the loader puts the key's name in front.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastagi.addresses import AddressError, AddressSet, parse_network

# key -> (parser, default) of one section, or of one entry of an array of tables
Schema = dict[str, tuple[Callable[[Any], Any], Any]]


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and the problem."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from `250ms`, `30s`, `10m`, `1h`, `1d`, `1w` or plain seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m, 1h, 1d, 1w")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use 250ms, 30s, 10m, 1h, 1d, 1w)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    # `not` of the comparison: NaN (TOML `nan`) fails every comparison, so it is refused too
    if not 0.001 <= seconds <= 10 * 365 * 86400:
        raise ValueError(f"{value!r} is out of range (at least 1ms, at most 10 years)")
    return seconds


def bounded_duration(value: Any, low: float, high: float) -> float:
    """A duration inside a section's own range (narrower than parse_duration's)."""
    seconds = parse_duration(value)
    if not low <= seconds <= high:
        raise ValueError(f"{value!r}: from {low:g}s to {high:g}s")
    return seconds


def whole(minimum: int, maximum: int) -> Callable[[Any], int]:
    """A parser of whole numbers from `minimum` to `maximum` (a TOML bool is not one);
    the maximum keeps absurd values out of the Lua step and Redis commands."""

    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value))
            except ValueError:
                raise ValueError(f"{value!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"{value} must be from {minimum} to {maximum:,}")
        return value

    return parse


def host_port(value: Any) -> tuple[str, int]:
    """HOST:PORT (an empty host is 127.0.0.1, brackets of an IPv6 host are dropped)."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def string_list(value: Any) -> tuple[str, ...]:
    """A TOML list of strings, or (from an environment override) comma-separated text."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(v.strip() for v in value)


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def choice(
    value: Any, choices: tuple[str, ...], problem: Callable[[str], str] | None = None
) -> str:
    """One of `choices`; `problem(text)` words the error where a key has its own wording."""
    text = string(value)
    if text not in choices:
        raise ValueError(problem(text) if problem else f"{text!r}: one of {', '.join(choices)}")
    return text


def boolean(value: Any) -> bool:
    """A TOML bool, or the words an environment override may use for one."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def networks(value: Any) -> AddressSet:
    entries = string_list(value)
    try:
        return AddressSet(parse_network(entry) for entry in entries)
    except AddressError as error:
        raise ValueError(str(error)) from None
