"""Reading the configuration: the file, the `FASTAGI_<SECTION>_<KEY>` overrides, each
key through its section's parser, then the checks that span keys and sections."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .auth import AUTH, AuthConfig, check_auth
from .exchange import EXPORT, INTEL, NOTIFY, ExportConfig, IntelConfig, NotifyConfig
from .firewall import FIREWALL, FirewallConfig
from .metrics import METRICS, MetricsConfig
from .screening import SCREENING, ScreeningConfig, check_screening
from .server import SERVER, ServerConfig, parse_key, with_key_file
from .store import REDIS, RedisConfig, check_cluster
from .values import ConfigError, Schema

SYSTEM_CONFIG = Path("/etc/fastagi/fastagi.toml")

# section -> key -> (parser, default); keys are parsed, and errors found, in this order
SCHEMA: dict[str, Schema] = {
    "server": SERVER,
    "screening": SCREENING,
    "redis": REDIS,
    "firewall": FIREWALL,
    "metrics": METRICS,
    "export": EXPORT,
    "notify": NOTIFY,
    "auth": AUTH,
    "intel": INTEL,
}


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    screening: ScreeningConfig
    redis: RedisConfig
    firewall: FirewallConfig
    metrics: MetricsConfig
    auth: AuthConfig = field(default_factory=AuthConfig)
    intel: IntelConfig = field(default_factory=IntelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
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
    "export": ExportConfig,
    "notify": NotifyConfig,
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
                value = text if parse is parse_key else _env_value(text)  # a key is text as given
                origin = env_name
            try:
                values[key] = parse(value)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"{origin}: {error}") from None
        sections[section] = _SECTIONS[section](**values)
    config = Config(**sections, source=str(file) if file else "built-in defaults")
    _check_together(config)
    if config.server.key_file:
        config = replace(config, server=with_key_file(config.server, environ))
    return config


def _check_together(config: Config) -> None:
    """The checks no single key can make, each section's own and those across sections."""
    check_screening(config.screening)
    if config.redis.timeout >= config.server.session_timeout:
        raise ConfigError("redis.timeout: must be shorter than server.session_timeout")
    if config.redis.cluster:
        check_cluster(config.redis)
    if config.auth.enabled and config.auth.ban_time > config.screening.ban_time_max:
        raise ConfigError("auth.ban_time: must not be longer than screening.ban_time_max")
    if config.auth.enabled:
        check_auth(config.auth)


def pbx_id(config: Config) -> str:
    """The name recorded on every ban: `screening.pbx_id`, else the hostname."""
    return config.screening.pbx_id or socket.gethostname()
