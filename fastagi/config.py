"""Configuration: a TOML file, `FASTAGI_<SECTION>_<KEY>` overrides, and checked values.

The built-in defaults are the embedded mode (`memory://` store, `dry-run` firewall),
so a newcomer runs the service with no file, no Redis and no root. Any bad key or
value becomes one `ConfigError` naming the key, which the CLI prints as one line.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.connection import parse_url

from fastagi.addresses import WIDEST, AddressError, AddressSet, Prefixes, parse_network
from fastagi.firewall._common import parse_ports
from fastagi.firewall.base import SIP_PORTS, FirewallError, FirewallSettings
from fastagi.protect import parse_entry

SYSTEM_CONFIG = Path("/etc/fastagi/fastagi.toml")
BACKENDS = ("iptables", "nftables", "ipset", "dry-run")


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


def _host_port(value: Any) -> tuple[str, int]:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _sentinels(value: Any) -> tuple[str, ...]:
    """Sentinel addresses, each HOST:PORT (an entry without a port would only fail
    later, inside redis-py, with a traceback)."""
    entries = _string_list(value)
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not HOST:PORT")
    return entries


def _whole(minimum: int, maximum: int) -> Callable[[Any], int]:
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
    length = _whole(0, 127)(value)
    if length and length < WIDEST[6]:
        raise ValueError(f"{length}: 0 (off) or {WIDEST[6]}-127")
    return length


def _networks(value: Any) -> AddressSet:
    entries = _string_list(value)
    try:
        return AddressSet(parse_network(entry) for entry in entries)
    except AddressError as error:
        raise ValueError(str(error)) from None


def _protect(value: Any) -> tuple[str, ...]:
    """`screening.protect`: addresses, networks and host names (resolved at run time)."""
    entries = _string_list(value)
    for entry in entries:
        parse_entry(entry)
    return entries


def _countries(value: Any) -> tuple[str, ...]:
    """Two-letter country codes (`["CN", "RU"]`), upper-cased."""
    from fastagi.geo import country_code

    return tuple(dict.fromkeys(country_code(code) for code in _string_list(value)))


def _country_thresholds(value: Any) -> dict[str, int]:
    """`{ CN = 2, US = 10 }`: a threshold of its own for each country named."""
    from fastagi.geo import country_code

    if not isinstance(value, dict):
        raise ValueError("expected a table of country code = threshold ({ CN = 2 })")
    parse = _whole(1, 1_000_000)
    out: dict[str, int] = {}
    for code, threshold in value.items():
        try:
            out[country_code(code)] = parse(threshold)
        except ValueError as error:
            raise ValueError(f"{code}: {error}") from None
    return out


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(v.strip() for v in value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _redis_url(value: Any) -> str:
    """A URL redis-py will take as it is: checked here, or it fails later with a
    traceback (a bad port) or silently (a database that is not a number means 0)."""
    url = _string(value)
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


def _backend(value: Any) -> str:
    name = _string(value)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (choose one of {', '.join(BACKENDS)})")
    return name


# Who writes the seed's NOTICE line into Asterisk's log: the shipped dialplan, from
# SCREEN_NOTICE (no AGI round trip), or the server through `EXEC Log` (other dialplans).
NOTICE_BY = ("dialplan", "agi")


def _notice_by(value: Any) -> str:
    name = _string(value)
    if name not in NOTICE_BY:
        raise ValueError(f"expected one of {', '.join(map(repr, NOTICE_BY))}, got {name!r}")
    return name


def _ports(value: Any) -> tuple[str, ...] | str:
    if value == "all":
        return "all"
    ports = _string_list(value)
    try:
        parse_ports(ports)  # the backends' own parser: one definition of a valid entry
    except FirewallError as error:
        raise ValueError(str(error).removeprefix("firewall.ports: ")) from None
    return ports


STATUS_PAGE = ("loopback", "on", "off")


def _status_page(value: Any) -> str:
    name = _string(value)
    if name not in STATUS_PAGE:
        raise ValueError(f"{name!r}: choose one of {', '.join(STATUS_PAGE)}")
    return name


def _listen_or_empty(value: Any) -> str:
    text = _string(value)
    if text:
        _host_port(text)
    return text


KEY_CHARACTERS = re.compile(r"[A-Za-z0-9._~-]{16,256}")


def _key(value: Any) -> str:
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
        return _key(text)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _absolute_or_empty(value: Any) -> str:
    text = _string(value)
    if text and not Path(text).is_absolute():
        raise ValueError(f"{text!r} is not an absolute path")
    return text


def _chain(value: Any) -> str:
    name = _string(value)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,27}", name):
        raise ValueError(f"{name!r}: letters, digits, _ and -, at most 28 characters")
    return name


def _host(value: Any) -> str:
    text = _string(value).strip().strip("[]")
    if not text or any(c.isspace() or c in "/@" for c in text):
        raise ValueError(f"{value!r} is not a host name or address")
    return text


def _one_line(value: Any) -> str:
    """Text that goes into an AMI action: a CR or LF would forge lines to Asterisk."""
    text = _string(value)
    if "\r" in text or "\n" in text or len(text) > 256:
        raise ValueError("CR or LF in the value, or longer than 256 characters")
    return text


def _auth_events(value: Any) -> tuple[str, ...]:
    from fastagi.ami import NEVER_COUNTED, SECURITY_EVENTS

    events = _string_list(value)
    for name in events:
        if name in NEVER_COUNTED:
            raise ValueError(f"{name} is not a failure (it never counts)")
        if name not in SECURITY_EVENTS:
            raise ValueError(f"{name!r} is not an Asterisk security event")
    if not events:
        raise ValueError("expected at least one event name")
    return events


def _feeds(value: Any) -> tuple[Any, ...]:
    """`[[intel.feed]]` entries (feeds.py reads them)."""
    from fastagi.feeds import parse_feeds

    return parse_feeds(value)


# section -> key -> (parser, default)
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "server": {
        "listen": (_host_port, "127.0.0.1:4573"),
        "allowed_clients": (_networks, ["127.0.0.1/32", "::1/128"]),
        "max_sessions": (_whole(1, 1_000_000), 256),
        "session_timeout": (parse_duration, "5s"),
        "runtime_dir": (_string, ""),
        # Optional shared secret Asterisk sends in the AGI URL (agi://.../screen?key=...),
        # or the file holding it; empty: none.
        "key": (_key, ""),
        "key_file": (_string, ""),
        # where the embedded (memory://) store keeps its bans across restarts
        "state_dir": (_absolute_or_empty, ""),
    },
    "screening": {
        "threshold": (_whole(1, 1_000_000), 5),
        "window": (parse_duration, "10m"),
        "ban_time": (parse_duration, "1h"),
        "ban_time_factor": (_factor, 2.0),
        "ban_time_max": (parse_duration, "1w"),
        "ignore": (_networks, ["127.0.0.0/8", "::1/128"]),
        "pbx_id": (_string, ""),
        "log_notice": (_bool, True),
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
        "ipv4_prefix": (_whole(WIDEST[4], 32), 32),
        "ipv6_prefix": (_whole(WIDEST[6], 128), 64),
        # Off by default: ban the wider IPv6 prefix (e.g. 48) once escalate_after
        # prefixes inside it are banned at the same time (escalate.py).
        "escalate_prefix": (_escalate_prefix, 0),
        "escalate_after": (_whole(2, 1_000_000), 4),
        # Countries (geo.py): a MaxMind-format .mmdb the admin provides (GeoLite2-Country,
        # DB-IP Lite); empty: no country rules.
        "geoip_db": (_string, ""),
        "deny_countries": (_countries, []),  # banned at the first guest call
        "allow_countries": (_countries, []),  # if set: every other country gets ...
        "other_countries_threshold": (_whole(1, 1_000_000), 1),  # ... this (1: at once)
        "country_thresholds": (_country_thresholds, {}),  # { CN = 2 }: a country's own
    },
    "redis": {
        "url": (_redis_url, "memory://"),
        "key_prefix": (_string, "fastagi:"),
        "timeout": (parse_duration, "250ms"),
        "sentinels": (_sentinels, []),
        "sentinel_service": (_string, "mymaster"),
        # Durability across a failover: after a step that bans, WAIT for this many
        # replicas to have the ban (0: do not wait), at most wait_timeout.
        "wait_replicas": (_whole(0, 100), 0),
        "wait_timeout": (parse_duration, "100ms"),
        # Redis Cluster: `url` is any one node (a seed); the client follows the slot map.
        "cluster": (_bool, False),
    },
    "firewall": {
        "backend": (_backend, "dry-run"),
        "chain": (_chain, "FASTAGI"),
        # SIP signalling only, as fail2ban's asterisk jail: a spoofed ban then costs the
        # spoofed address its SIP, not its trunk, Redis, DNS or SSH traffic.
        "ports": (_ports, list(SIP_PORTS)),
        "forward": (_bool, False),
        "sync_interval": (parse_duration, "30s"),
    },
    "metrics": {
        "listen": (_listen_or_empty, ""),
        # `fastagi-ctl agent`'s own /metrics: serve and agent read one config on a PBX, so
        # one address for both would leave the second unable to start.
        "agent_listen": (_listen_or_empty, ""),
        # The status page at / of that listener (web.py): "loopback" serves it only when
        # `listen` is a loopback address, so exposing /metrics does not expose it.
        "status_page": (_status_page, "loopback"),
    },
    # Password guessing: Asterisk's AMI security events, counted cluster-wide (auth.py).
    "auth": {
        "enabled": (_bool, False),
        "host": (_host, "127.0.0.1"),
        "port": (_whole(1, 65535), 5038),
        "username": (_one_line, ""),
        "secret": (_one_line, ""),
        "secret_file": (_string, ""),
        "events": (
            _auth_events,
            ["ChallengeResponseFailed", "InvalidPassword", "InvalidAccountID", "FailedACL"],
        ),
        "threshold": (_whole(1, 1_000_000), 5),
        "window": (parse_duration, "10m"),
        "ban_time": (parse_duration, "1h"),
    },
    # Blocklists in (feeds.py): [[intel.feed]] name, url or file, format, refresh, timeout.
    "intel": {
        "feed": (_feeds, []),
    },
}


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


@dataclass(frozen=True)
class FirewallConfig:
    backend: str
    chain: str
    ports: tuple[str, ...] | str
    forward: bool
    sync_interval: float

    def settings(self) -> FirewallSettings:
        return FirewallSettings(self.backend, self.chain, self.ports, self.forward)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str
    agent_listen: str = ""
    status_page: str = "loopback"


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


@dataclass(frozen=True)
class IntelConfig:
    feed: tuple[Any, ...] = ()  # feeds.FeedSpec, one per [[intel.feed]]


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    screening: ScreeningConfig
    redis: RedisConfig
    firewall: FirewallConfig
    metrics: MetricsConfig
    auth: AuthConfig = field(default_factory=AuthConfig)
    intel: IntelConfig = field(default_factory=IntelConfig)
    source: str = field(default="built-in defaults")

    def runtime_dir(self) -> Path:
        """Where the embedded store's socket lives, so the CLI finds a running service."""
        for candidate in (
            self.server.runtime_dir,
            os.environ.get("FASTAGI_RUNTIME_DIR", ""),
            os.environ.get("RUNTIME_DIRECTORY", ""),
        ):
            if candidate:
                return Path(candidate)
        if xdg := os.environ.get("XDG_RUNTIME_DIR"):
            return Path(xdg) / "fastagi"
        return Path(f"/tmp/fastagi-{os.getuid()}")

    def state_dir(self) -> Path:
        """Where the embedded store saves its bans: `server.state_dir`, else systemd's
        `StateDirectory=` ($STATE_DIRECTORY), else /var/lib/fastagi for root (a system
        service), else $XDG_STATE_HOME/fastagi or ~/.local/state/fastagi."""
        if self.server.state_dir:
            return Path(self.server.state_dir)
        if systemd := os.environ.get("STATE_DIRECTORY", "").split(":")[0]:
            return Path(systemd)
        if os.geteuid() == 0:
            return Path("/var/lib/fastagi")
        if xdg := os.environ.get("XDG_STATE_HOME"):
            return Path(xdg) / "fastagi"
        try:
            return Path.home() / ".local" / "state" / "fastagi"
        except RuntimeError:
            raise ConfigError("server.state_dir: this user has no home directory; set it") from None


_SECTIONS = {
    "server": ServerConfig,
    "screening": ScreeningConfig,
    "redis": RedisConfig,
    "firewall": FirewallConfig,
    "metrics": MetricsConfig,
    "auth": AuthConfig,
    "intel": IntelConfig,
}


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """`--config`, else `$FASTAGI_CONFIG`, else the system file if present."""
    if explicit:
        return Path(explicit)
    if environ.get("FASTAGI_CONFIG"):
        return Path(environ["FASTAGI_CONFIG"])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def _env_value(text: str) -> Any:
    """An override is read as a TOML value when it is one (`5`, `["a"]`), else as text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override and check the configuration; raise ConfigError on the first problem."""
    environ = os.environ if environ is None else environ
    file = find_config_file(path, environ)
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {file}: not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {file}: cannot read it ({error})") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {file}: not valid TOML ({error})") from None
    for section, value in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"[{section}]: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a [{section}] table")
        for key in value:
            if key not in SCHEMA[section]:
                known = ", ".join(SCHEMA[section])
                raise ConfigError(f"{section}.{key}: unknown key (known: {known})")
    sections = {}
    for section, keys in SCHEMA.items():
        values = {}
        for key, (parse, default) in keys.items():
            value = raw.get(section, {}).get(key, default)
            env_name = f"FASTAGI_{section.upper()}_{key.upper()}"
            origin = f"{section}.{key}"
            if env_name in environ:
                text = environ[env_name]
                value = text if parse is _key else _env_value(text)  # a key is text as given
                origin = env_name
            try:
                values[key] = parse(value)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"{origin}: {error}") from None
        sections[section] = _SECTIONS[section](**values)
    config = Config(**sections, source=str(file) if file else "built-in defaults")
    _check_together(config)
    if config.server.key_file:
        origin = "FASTAGI_SERVER_KEY_FILE" if "FASTAGI_SERVER_KEY_FILE" in environ else ""
        origin = origin or "server.key_file"
        if config.server.key:
            raise ConfigError(f"{origin}: set either server.key or server.key_file, not both")
        try:
            key = read_key_file(config.server.key_file)
        except ValueError as error:
            raise ConfigError(f"{origin}: {error}") from None
        config = replace(config, server=replace(config.server, key=key))
    return config


def _check_together(config: Config) -> None:
    screening = config.screening
    if screening.ban_time_max < screening.ban_time:
        raise ConfigError("screening.ban_time_max: must not be shorter than screening.ban_time")
    if screening.escalate_prefix and screening.escalate_prefix >= screening.ipv6_prefix:
        raise ConfigError(
            "screening.escalate_prefix: must be shorter than screening.ipv6_prefix "
            f"({screening.escalate_prefix} >= {screening.ipv6_prefix})"
        )
    _check_countries(screening)
    if config.redis.timeout >= config.server.session_timeout:
        raise ConfigError("redis.timeout: must be shorter than server.session_timeout")
    if config.redis.cluster:
        _check_cluster(config.redis)
    if config.auth.enabled and config.auth.ban_time > screening.ban_time_max:
        raise ConfigError("auth.ban_time: must not be longer than screening.ban_time_max")
    if config.auth.enabled:
        _check_auth(config.auth)


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


def _check_auth(auth: AuthConfig) -> None:
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


def _check_cluster(redis: RedisConfig) -> None:
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


def pbx_id(config: Config) -> str:
    """The name recorded on every ban: `screening.pbx_id`, else the hostname."""
    return config.screening.pbx_id or socket.gethostname()


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
