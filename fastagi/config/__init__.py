"""Configuration: a TOML file, `FASTAGI_<SECTION>_<KEY>` overrides, and checked values.

The built-in defaults are the embedded mode (`memory://` store, `dry-run` firewall),
so a newcomer runs the service with no file, no Redis and no root. Any bad key or
value becomes one `ConfigError` naming the key, which the CLI prints as one line.

One module a job: loader.py reads and checks the whole, values.py holds the parsers
every section uses, and each group of sections has its own module (server, screening,
store for [redis], firewall, metrics, auth, exchange for [intel] [export] [notify]).
"""

from __future__ import annotations

from fastagi.config.auth import AuthConfig, ami_secret
from fastagi.config.exchange import ExportConfig, IntelConfig, NotifyConfig, WebhookConfig
from fastagi.config.firewall import FirewallConfig
from fastagi.config.loader import SCHEMA, Config, load, pbx_id
from fastagi.config.metrics import MetricsConfig
from fastagi.config.screening import ScreeningConfig
from fastagi.config.server import ServerConfig
from fastagi.config.store import RedisConfig, redacted
from fastagi.config.values import ConfigError, parse_duration

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
