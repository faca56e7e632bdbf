"""`[screening]`: the policy, who is counted, when a caller is banned and for how long,
per prefix and per country."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastagi.addresses import WIDEST, AddressSet, Prefixes
from fastagi.protect import parse_entry

from .values import (
    ConfigError,
    Schema,
    boolean,
    choice,
    networks,
    parse_duration,
    string,
    string_list,
    whole,
)


@dataclass(frozen=True)
class ScreeningConfig:
    threshold: int
    window: float
    ban_time: float
    ban_time_factor: float
    ban_time_max: float
    ignore: AddressSet
    pbx_id: str
    log_notice: bool
    notice_by: str = "dialplan"
    protect: tuple[str, ...] = ()
    protect_refresh: float = 300.0
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    escalate_prefix: int = 0
    escalate_after: int = 4
    geoip_db: str = ""
    deny_countries: tuple[str, ...] = ()
    allow_countries: tuple[str, ...] = ()
    other_countries_threshold: int = 1
    country_thresholds: dict[str, int] = field(default_factory=dict)

    def prefixes(self) -> Prefixes:
        return Prefixes(self.ipv4_prefix, self.ipv6_prefix)


def _factor(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if not 1.0 <= number <= 100.0:
        raise ValueError(f"{number} must be between 1 and 100")
    return number


def _escalate_prefix(value: Any) -> int:
    """0 (off) or an IPv6 prefix length no wider than WIDEST."""
    length = whole(0, 127)(value)
    if length and length < WIDEST[6]:
        raise ValueError(f"{length}: 0 (off) or {WIDEST[6]}-127")
    return length


def _protect(value: Any) -> tuple[str, ...]:
    """`screening.protect`: addresses, networks and host names (resolved at run time)."""
    entries = string_list(value)
    for entry in entries:
        parse_entry(entry)
    return entries


def _countries(value: Any) -> tuple[str, ...]:
    """Two-letter country codes (`["CN", "RU"]`), upper-cased."""
    from fastagi.geo import country_code

    return tuple(dict.fromkeys(country_code(code) for code in string_list(value)))


def _country_thresholds(value: Any) -> dict[str, int]:
    """`{ CN = 2, US = 10 }`: a threshold of its own for each country named."""
    from fastagi.geo import country_code

    if not isinstance(value, dict):
        raise ValueError("expected a table of country code = threshold ({ CN = 2 })")
    parse = whole(1, 1_000_000)
    out: dict[str, int] = {}
    for code, threshold in value.items():
        try:
            out[country_code(code)] = parse(threshold)
        except ValueError as error:
            raise ValueError(f"{code}: {error}") from None
    return out


# Who writes the seed's NOTICE line into Asterisk's log: the shipped dialplan, from
# SCREEN_NOTICE (no AGI round trip), or the server through `EXEC Log` (other dialplans).
NOTICE_BY = ("dialplan", "agi")


def _notice_by(value: Any) -> str:
    quoted = ", ".join(map(repr, NOTICE_BY))
    return choice(value, NOTICE_BY, lambda name: f"expected one of {quoted}, got {name!r}")


SCREENING: Schema = {
    "threshold": (whole(1, 1_000_000), 5),
    "window": (parse_duration, "10m"),
    "ban_time": (parse_duration, "1h"),
    "ban_time_factor": (_factor, 2.0),
    "ban_time_max": (parse_duration, "1w"),
    "ignore": (networks, ["127.0.0.0/8", "::1/128"]),
    "pbx_id": (string, ""),
    "log_notice": (boolean, True),
    # Who writes that NOTICE: the shipped dialplan from SCREEN_NOTICE ("dialplan",
    # no AGI round trip), or the server through EXEC Log ("agi": other dialplans).
    "notice_by": (_notice_by, "dialplan"),
    # Never counted, banned or applied, on top of the built-in protected set (this
    # host, gateways, resolvers, Redis nodes, allowed_clients, ignore, special ranges):
    # addresses, networks and host names (trunks, dynamic-DNS offices).
    "protect": (_protect, []),
    "protect_refresh": (parse_duration, "5m"),
    # Callers are counted and banned per prefix: an IPv6 scanner owns a whole /64.
    # (no wider than WIDEST: one caller's calls would ban a provider's customers)
    "ipv4_prefix": (whole(WIDEST[4], 32), 32),
    "ipv6_prefix": (whole(WIDEST[6], 128), 64),
    # Off by default: ban the wider IPv6 prefix (e.g. 48) once escalate_after
    # prefixes inside it are banned at the same time (escalate.py).
    "escalate_prefix": (_escalate_prefix, 0),
    "escalate_after": (whole(2, 1_000_000), 4),
    # Countries (geo.py): a MaxMind-format .mmdb the admin provides (GeoLite2-Country,
    # DB-IP Lite); empty: no country rules.
    "geoip_db": (string, ""),
    "deny_countries": (_countries, []),  # banned at the first guest call
    "allow_countries": (_countries, []),  # if set: every other country gets ...
    "other_countries_threshold": (whole(1, 1_000_000), 1),  # ... this (1: at once)
    "country_thresholds": (_country_thresholds, {}),  # { CN = 2 }: a country's own
}


def check_screening(screening: ScreeningConfig) -> None:
    """What no single key can check: ban times in order, escalation wider than the ban
    prefix, and country rules that have a database and do not contradict each other."""
    if screening.ban_time_max < screening.ban_time:
        raise ConfigError("screening.ban_time_max: must not be shorter than screening.ban_time")
    if screening.escalate_prefix and screening.escalate_prefix >= screening.ipv6_prefix:
        raise ConfigError(
            "screening.escalate_prefix: must be shorter than screening.ipv6_prefix "
            f"({screening.escalate_prefix} >= {screening.ipv6_prefix})"
        )
    _check_countries(screening)


def _check_countries(screening: ScreeningConfig) -> None:
    """Country rules need a database, and a country in two rules is a contradiction."""
    rules = {
        "deny_countries": set(screening.deny_countries),
        "allow_countries": set(screening.allow_countries),
        "country_thresholds": set(screening.country_thresholds),
    }
    named = [name for name, codes in rules.items() if codes]
    if named and not screening.geoip_db:
        raise ConfigError(f"screening.{named[0]}: needs screening.geoip_db (a .mmdb file)")
    for first, second in (
        ("deny_countries", "allow_countries"),
        ("deny_countries", "country_thresholds"),
    ):
        if both := sorted(rules[first] & rules[second]):
            raise ConfigError(f"screening.{first}: {', '.join(both)} also in screening.{second}")
