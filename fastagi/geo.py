"""Callers' countries: a MaxMind-format database (GeoLite2-Country, DB-IP Lite) and the
`[screening]` country rules.

The admin provides the `.mmdb` file (`screening.geoip_db`); we never download one. A
guest call from a `deny_countries` country is banned at its first call; with
`allow_countries`, callers from every other country get `other_countries_threshold`
(1: banned at once); `country_thresholds` gives single countries a threshold of their
own. A caller whose address the database does not know keeps the usual threshold.

The lookup runs on every screened call (after `ignore` and the protected set, which
never reach it), so it must cost microseconds: maxminddb's C reader on a memory-mapped
file, and a bounded cache of address -> country, since scanners call again and again
from the same addresses. A missing or unreadable database is one warning line at start
(and a FAIL line from `check`): screening then runs without country rules.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastagi.addresses import IPAddress

if TYPE_CHECKING:
    from fastagi.config import ScreeningConfig

log = logging.getLogger("fastagi.geo")

CODE = re.compile(r"[A-Z]{2}")  # ISO 3166-1 alpha-2: also bounds the metric's labels
CACHE_LIMIT = 65_536  # addresses remembered; past it the cache starts afresh
UNKNOWN = ""  # a caller the database does not place
RELOAD_EVERY = 60.0  # seconds between looks at the file (replaced by geoipupdate?)


class GeoError(Exception):
    """The database cannot be used; the message says which file and why."""


def country_code(text: Any) -> str:
    """A country code from the config, upper-cased; ValueError when it is not one."""
    if not isinstance(text, str) or not CODE.fullmatch(text.strip().upper()):
        raise ValueError(f"{text!r} is not a two-letter country code (ISO 3166-1: CN, DE, US)")
    return text.strip().upper()


def _code_of(record: Any) -> str:
    """The country of one database record: `country` (where the address is used), else
    `registered_country` (where its block is registered), as GeoLite2-Country and DB-IP
    Lite lay them out; UNKNOWN for anything else."""
    if not isinstance(record, dict):
        return UNKNOWN
    for key in ("country", "registered_country"):
        part = record.get(key)
        code = part.get("iso_code") if isinstance(part, dict) else None
        if isinstance(code, str) and CODE.fullmatch(code):
            return code
    return UNKNOWN


class GeoDB:
    """One open database with its cache."""

    def __init__(self, path: str) -> None:
        import maxminddb

        self.path = path
        try:
            self._reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
            meta = self._reader.metadata()
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as error:
            why = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise GeoError(f"screening.geoip_db: cannot read {path} ({why})") from None
        self.kind = str(meta.database_type)
        self.built = int(meta.build_epoch)
        self.ip_version = int(meta.ip_version)
        self._cache: dict[IPAddress, str] = {}

    def country(self, address: IPAddress) -> str:
        """The address's country code, or UNKNOWN."""
        cache = self._cache
        code = cache.get(address)
        if code is None:
            try:
                code = _code_of(self._reader.get(address))
            except ValueError:  # an IPv6 address in an IPv4-only database
                code = UNKNOWN
            if len(cache) >= CACHE_LIMIT:
                cache.clear()
            cache[address] = code
        return code

    def describe(self) -> str:
        built = time.strftime("%Y-%m-%d", time.gmtime(self.built))
        return f"{self.path} ({self.kind}, built {built}, IPv{self.ip_version})"

    def close(self) -> None:
        self._reader.close()


@dataclass(frozen=True)
class CountryRules:
    """What a country's callers get; None: the usual threshold."""

    deny: frozenset[str] = frozenset()
    allow: frozenset[str] = frozenset()
    other_threshold: int = 1
    thresholds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_config(cls, screening: ScreeningConfig) -> CountryRules:
        return cls(
            frozenset(screening.deny_countries),
            frozenset(screening.allow_countries),
            screening.other_countries_threshold,
            dict(screening.country_thresholds),
        )

    @property
    def any(self) -> bool:
        return bool(self.deny or self.allow or self.thresholds)

    def threshold(self, country: str) -> int | None:
        """Deny first, then the country's own threshold, then allow's "everyone else"."""
        if not country:
            return None
        if country in self.deny:
            return 1
        if country in self.thresholds:
            return self.thresholds[country]
        if self.allow and country not in self.allow:
            return self.other_threshold
        return None


class Countries:
    """The screener's view: a caller's country and the threshold it gets.

    geoipupdate replaces the file (a new inode) every week or so: once a minute the file
    is looked at, and a changed one is opened and swapped in; one that cannot be read
    keeps the old database (one warning)."""

    def __init__(self, db: GeoDB, rules: CountryRules) -> None:
        self.db = db
        self.rules = rules
        self._identity = _identity(db.path)
        self._next_look = time.monotonic() + RELOAD_EVERY

    def rule(self, address: IPAddress) -> tuple[str, int | None]:
        if time.monotonic() >= self._next_look:
            self._look()
        country = self.db.country(address)
        return country, self.rules.threshold(country)

    def _look(self) -> None:
        self._next_look = time.monotonic() + RELOAD_EVERY
        identity = _identity(self.db.path)
        if identity is None or identity == self._identity:
            return
        self._identity = identity
        try:
            db = GeoDB(self.db.path)
        except GeoError as error:
            log.warning("%s: keeping the database read before", error)
            return
        old, self.db = self.db, db
        old.close()
        log.info("countries from %s (the file changed)", db.describe())

    @classmethod
    def from_config(cls, screening: ScreeningConfig) -> Countries | None:
        """The configured database and rules; None (one warning line) when the database
        cannot be read, so screening goes on without country rules."""
        if not screening.geoip_db:
            return None
        try:
            db = GeoDB(screening.geoip_db)
        except GeoError as error:
            log.warning("%s: screening runs without country rules", error)
            return None
        log.info("countries from %s", db.describe())
        return cls(db, CountryRules.from_config(screening))


def _identity(path: str) -> tuple[int, int, int] | None:
    """What tells a replaced file: inode, size, modification time (None: unreadable)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def target_country(db: GeoDB | None, target: str, recorded: str = "") -> str | None:
    """The country of a ban-list or counted entry for `status`: the one recorded with
    its ban, else the database's for its (first) address; None without a database."""
    if recorded and CODE.fullmatch(recorded):
        return recorded
    if db is None:
        return None
    from fastagi.addresses import AddressError, parse_target

    try:
        return db.country(parse_target(target).network_address)
    except AddressError:
        return UNKNOWN


def open_db(path: str) -> GeoDB | None:
    """The database for `status` (country of each entry), or None when there is none."""
    if not path or not os.path.exists(path):
        return None
    try:
        return GeoDB(path)
    except GeoError:
        return None
