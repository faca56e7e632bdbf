"""Config parsing: durations, overrides, defaults (the embedded mode)."""

from __future__ import annotations

import ipaddress

import pytest

from fastagi.addresses import AddressError, AddressSet, parse_address
from fastagi.config import ConfigError, load, parse_duration


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("10m", 600),
        ("1h", 3600),
        ("1d", 86400),
        ("1w", 604800),
        ("45", 45),
        (90, 90),
        ("1.5h", 5400),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1y", "-5s", "0", "abc", "1 h m", True])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_are_the_embedded_mode():
    config = load(None, {})
    assert config.redis.url == "memory://"
    assert config.firewall.backend == "dry-run"
    assert config.server.listen == ("127.0.0.1", 4573)
    assert config.screening.threshold == 5 and config.screening.window == 600


def test_file_then_environment_override(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[screening]\nthreshold = 7\nignore = ["10.0.0.0/8"]\n')
    config = load(
        str(path),
        {"FASTAGI_SCREENING_THRESHOLD": "9", "FASTAGI_FIREWALL_PORTS": '["5060/udp", "5061/tcp"]'},
    )
    assert config.screening.threshold == 9
    assert parse_address("10.1.2.3") in config.screening.ignore
    assert config.firewall.ports == ("5060/udp", "5061/tcp")


def test_config_from_environment_variable_path(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[redis]\nurl = "redis://10.0.0.5:6379/0"\n')
    assert load(None, {"FASTAGI_CONFIG": str(path)}).redis.url == "redis://10.0.0.5:6379/0"


def test_inconsistent_values_are_refused():
    with pytest.raises(ConfigError, match="ban_time_max"):
        load(None, {"FASTAGI_SCREENING_BAN_TIME": "2w"})


def test_redis_cluster_is_off_by_default_and_takes_a_seed_url():
    assert load(None, {}).redis.cluster is False
    config = load(
        None, {"FASTAGI_REDIS_CLUSTER": "true", "FASTAGI_REDIS_URL": "rediss://10.0.0.5:7000"}
    )
    assert config.redis.cluster is True and config.redis.url == "rediss://10.0.0.5:7000"


@pytest.mark.parametrize(
    "overrides,culprit",
    [
        ({}, "redis.cluster: needs a redis:// or rediss:// url"),  # memory://
        ({"FASTAGI_REDIS_URL": "unix:///run/redis.sock"}, "not unix://"),
        (
            {"FASTAGI_REDIS_URL": "redis://h:7000", "FASTAGI_REDIS_SENTINELS": '["h:26379"]'},
            "Sentinel",
        ),
        (
            {"FASTAGI_REDIS_URL": "redis://h:7000", "FASTAGI_REDIS_WAIT_REPLICAS": "1"},
            "wait_replicas",
        ),
        ({"FASTAGI_REDIS_URL": "redis://h:7000/2"}, "database 0 only"),
    ],
)
def test_redis_cluster_with_what_cannot_work_is_refused(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load(None, {"FASTAGI_REDIS_CLUSTER": "true", **overrides})


@pytest.mark.parametrize(
    "text,canonical",
    [
        ("203.0.113.9", "203.0.113.9"),
        ("203.0.113.9:5060", "203.0.113.9"),
        ("[2001:db8::9]:5060", "2001:db8::9"),
        ("2001:DB8::9", "2001:db8::9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("[::ffff:203.0.113.9]:5060", "203.0.113.9"),
        # A zone names our interface, not the caller (CHANNEL(recvip) of a link-local caller)
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%eth0]:5060", "fe80::1"),
        ("FE80::1%2", "fe80::1"),
    ],
)
def test_addresses_have_one_spelling(text, canonical):
    assert str(parse_address(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.2.3",
        "203.0.113.9:99999",
        "[2001:db8::9",
        "fe80::1%",
        "fe80::1%a b",
        "fe80::1%eth0:5060",
        "203.0.113.9%eth0",
        "a" * 100,
        "1.2.3.4:5:6",
        "203.0.113.9:",
    ],
)
def test_garbage_addresses_are_refused(text):
    with pytest.raises(AddressError):
        parse_address(text)


@pytest.mark.parametrize(
    "entry,caller,inside",
    [
        ("::ffff:192.0.2.0/120", "192.0.2.9", True),
        ("::ffff:192.0.2.0/120", "::ffff:192.0.2.9", True),
        ("::ffff:192.0.2.0/120", "192.0.3.9", False),
        ("::ffff:192.0.2.9", "192.0.2.9", True),
        ("192.0.2.0/24", "::ffff:192.0.2.9", True),
        ("::ffff:0:0/96", "203.0.113.9", True),
        ("2001:db8::/32", "192.0.2.9", False),
    ],
)
def test_ignore_entries_in_mapped_form_match_ipv4_callers_both_ways(entry, caller, inside):
    ignore = AddressSet.parse([entry])
    assert (parse_address(caller) in ignore) is inside
    assert (ipaddress.ip_address(caller) in ignore) is inside


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, "auth.username"),
        ({"FASTAGI_AUTH_USERNAME": "fastagi"}, "auth.secret"),
        (
            {
                "FASTAGI_AUTH_USERNAME": "fastagi",
                "FASTAGI_AUTH_SECRET": "x",
                "FASTAGI_AUTH_SECRET_FILE": "/nonexistent",
            },
            "auth.secret",
        ),
        (
            {"FASTAGI_AUTH_USERNAME": "fastagi", "FASTAGI_AUTH_SECRET_FILE": "/nonexistent/x"},
            "auth.secret_file",
        ),
    ],
)
def test_auth_enabled_needs_a_user_and_one_secret(environ, names):
    with pytest.raises(ConfigError, match=names):
        load(None, {"FASTAGI_AUTH_ENABLED": "true", **environ})


def test_an_auth_ban_longer_than_ban_time_max_is_refused_only_when_auth_is_on():
    """A disabled watcher's defaults never stop a config with a short ban_time_max."""
    short = {"FASTAGI_SCREENING_BAN_TIME": "5s", "FASTAGI_SCREENING_BAN_TIME_MAX": "1m"}
    assert not load(None, short).auth.enabled
    on = {
        **short,
        "FASTAGI_AUTH_ENABLED": "true",
        "FASTAGI_AUTH_USERNAME": "fastagi",
        "FASTAGI_AUTH_SECRET": "x",
    }
    with pytest.raises(ConfigError, match=r"auth\.ban_time"):
        load(None, on)
    assert load(None, {**on, "FASTAGI_AUTH_BAN_TIME": "30s"}).auth.ban_time == 30


def test_auth_secret_file_and_its_escape(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("line1\n")
    base = {"FASTAGI_AUTH_ENABLED": "true", "FASTAGI_AUTH_USERNAME": "fastagi"}
    config = load(None, {**base, "FASTAGI_AUTH_SECRET_FILE": str(secret)})
    assert config.auth.secret_file == str(secret)
    assert "line1" not in repr(config)  # a secret never reaches a log line via repr
    secret.write_text("a\rAction: Originate\n")
    with pytest.raises(ConfigError, match=r"auth\.secret_file"):
        load(None, {**base, "FASTAGI_AUTH_SECRET_FILE": str(secret)})


def test_a_credentials_directory_path_is_left_to_the_service(monkeypatch):
    """`${CREDENTIALS_DIRECTORY}/ami-secret` (the unit's LoadCredential=): an admin shell
    without that variable still loads the config for status, ban, unban."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = load(
        None,
        {
            "FASTAGI_AUTH_ENABLED": "true",
            "FASTAGI_AUTH_USERNAME": "fastagi",
            "FASTAGI_AUTH_SECRET_FILE": "${CREDENTIALS_DIRECTORY}/ami-secret",
        },
    )
    assert config.auth.enabled
