"""Configuration: a TOML file, `FASTAGI_<SECTION>_<KEY>` overrides, and checked values.

The built-in defaults are the embedded mode (`memory://` store, `dry-run` firewall),
so a newcomer runs the service with no file, no Redis and no root. Any bad key or
value becomes one `ConfigError` naming the key, which the CLI prints as one line.

One module a job: loader.py reads and checks the whole, values.py holds the parsers
every section uses, and each group of sections has its own module (server, screening,
store for [redis], firewall, metrics, auth, exchange for [intel] [export] [notify]).
"""

from __future__ import annotations

from .auth import AuthConfig, ami_secret
from .exchange import ExportConfig, IntelConfig, NotifyConfig, WebhookConfig
from .firewall import FirewallConfig
from .loader import SCHEMA, Config, load, pbx_id
from .metrics import MetricsConfig
from .screening import ScreeningConfig
from .server import ServerConfig
from .store import RedisConfig, redacted
from .values import ConfigError, parse_duration

__all__ = [
    "SCHEMA",
    "AuthConfig",
    "Config",
    "ConfigError",
    "ExportConfig",
    "FirewallConfig",
    "IntelConfig",
    "MetricsConfig",
    "NotifyConfig",
    "RedisConfig",
    "ScreeningConfig",
    "ServerConfig",
    "WebhookConfig",
    "ami_secret",
    "load",
    "parse_duration",
    "pbx_id",
    "redacted",
]
