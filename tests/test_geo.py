"""Countries (issue 18, must show 1): a small MaxMind-format database written in the test
(mmdb-writer) maps test networks to countries; deny, allow and per-country thresholds
act through real FastAGI sessions (the emulator plays Asterisk); the country reaches the
ban record, `status` and the metrics; without a readable database screening is what it
was and `check` says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet
from prometheus_client import generate_latest

from fastagi.emulator import Call
from fastagi.geo import GeoDB
from fastagi.metrics import Metrics
from fastagi.status import gather_status, render_status
from tests.harness import running_server
from tests.procs import ctl

# network -> country, as GeoLite2-Country lays records out (DB-IP Lite is the same shape)
NETWORKS = {
    "198.51.100.0/24": "CN",  # denied
    "203.0.113.0/25": "DE",  # allowed
    "203.0.113.128/25": "FR",  # neither: "everyone else"
    "198.18.0.0/24": "US",  # allowed, with a threshold of its own
    "2001:db8:1::/48": "JP",  # neither, IPv6
}
RULES = {
    "SCREENING_DENY_COUNTRIES": '["CN"]',
    "SCREENING_ALLOW_COUNTRIES": '["de", "US"]',
    "SCREENING_OTHER_COUNTRIES_THRESHOLD": "2",
    "SCREENING_COUNTRY_THRESHOLDS": "{ US = 3 }",
}


def write_db(path: Path, networks: dict[str, str] = NETWORKS) -> str:
    writer = MMDBWriter(
        ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country", languages=["en"]
    )
    for network, code in networks.items():
        record = {"country": {"iso_code": code, "names": {"en": code}}}
        if code == "JP":  # only where the block is registered: the fallback field
            record = {"registered_country": {"iso_code": code}}
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return str(path)


@pytest.fixture
def geo_db(tmp_path: Path) -> str:
    return write_db(tmp_path / "countries.mmdb")


async def results(running, source: str, calls: int) -> list[str]:
    out = []
    for _ in range(calls):
        result = await running.call(Call(source=source))
        out.append(result.variables["SCREEN_RESULT"])
    return out


def test_the_database_gives_each_test_network_its_country(geo_db):
    import ipaddress

    db = GeoDB(geo_db)
    found = {
        ip: db.country(ipaddress.ip_address(ip))
        for ip in ("198.51.100.9", "203.0.113.9", "203.0.113.200", "198.18.0.1", "2001:db8:1::7")
    }
    assert found == {
        "198.51.100.9": "CN",
        "203.0.113.9": "DE",
        "203.0.113.200": "FR",
        "198.18.0.1": "US",
        "2001:db8:1::7": "JP",
    }
    assert db.country(ipaddress.ip_address("100.64.0.1")) == ""  # not in the database


def test_deny_allow_and_country_thresholds_through_real_sessions(geo_db):
    async def scenario():
        metrics = Metrics()
        async with running_server(metrics=metrics, SCREENING_GEOIP_DB=geo_db, **RULES) as running:
            seen = {
                "CN": await results(running, "198.51.100.9", 1),
                "DE": await results(running, "203.0.113.9", 5),
                "US": await results(running, "198.18.0.1", 3),
                "FR": await results(running, "203.0.113.200", 2),
                "JP": await results(running, "2001:db8:1::7", 2),
                "unknown": await results(running, "100.64.0.1", 5),
            }
            records = {ip: await running.store.record(ip) for ip in ("198.51.100.9", "198.18.0.1")}
            status = await gather_status(running.store, running.config)
        return seen, records, status, generate_latest(metrics.registry).decode()

    seen, records, status, exposition = asyncio.run(scenario())
    assert seen == {
        "CN": ["BANNED"],  # denied: banned at the first guest call
        "DE": ["COUNTED"] * 4 + ["BANNED"],  # allowed: the usual threshold (5)
        "US": ["COUNTED"] * 2 + ["BANNED"],  # its own threshold (3)
        "FR": ["COUNTED", "BANNED"],  # not allowed: other_countries_threshold (2)
        "JP": ["COUNTED", "BANNED"],  # the same for IPv6 (its /64)
        "unknown": ["COUNTED"] * 4 + ["BANNED"],  # not in the database: the usual threshold
    }
    assert records["198.51.100.9"]["country"] == "CN"
    assert records["198.18.0.1"]["country"] == "US"
    countries = {ban["ip"]: ban["country"] for ban in status["banned"]["list"]}
    assert countries == {
        "198.51.100.9": "CN",
        "203.0.113.9": "DE",
        "198.18.0.1": "US",
        "203.0.113.200": "FR",
        "2001:db8:1::/64": "JP",
        "100.64.0.1": "",
    }
    shown = render_status(status)
    assert re.search(r"198\.51\.100\.9 until .*, country CN\)", shown), shown
    assert re.search(r"100\.64\.0\.1 until .*, country \?\?\)", shown), shown
    assert 'fastagi_country_calls_total{banned="yes",country="CN"} 1.0' in exposition
    assert 'fastagi_country_calls_total{banned="no",country="DE"} 4.0' in exposition
    assert 'fastagi_country_calls_total{banned="yes",country="unknown"} 1.0' in exposition


def test_protected_and_ignored_callers_are_never_judged_by_country(geo_db):
    async def scenario():
        async with running_server(
            SCREENING_GEOIP_DB=geo_db,
            SCREENING_IGNORE='["127.0.0.0/8", "198.51.100.77/32"]',
            SCREENING_PROTECT='["198.51.100.78"]',
            **RULES,
        ) as running:
            ignored = await running.call(Call(source="198.51.100.77"))
            protected = await running.call(Call(source="198.51.100.78"))
            return ignored.variables, protected.variables, await running.store.banned()

    ignored, protected, banned = asyncio.run(scenario())
    assert ignored["SCREEN_RESULT"] == "IGNORED" and ignored["SCREEN_REASON"] == "ignore"
    assert protected["SCREEN_RESULT"] == "IGNORED" and protected["SCREEN_REASON"] == "protected"
    assert banned == {}


def test_without_a_readable_database_screening_is_unchanged(tmp_path, caplog):
    broken = tmp_path / "broken.mmdb"
    broken.write_bytes(b"not a database" * 10)

    async def scenario(path: str):
        async with running_server(SCREENING_GEOIP_DB=path, **RULES) as running:
            return await results(running, "198.51.100.9", 5)

    for path in (str(tmp_path / "missing.mmdb"), str(broken)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastagi.geo"):
            assert asyncio.run(scenario(path)) == ["COUNTED"] * 4 + ["BANNED"]
        lines = [r.getMessage() for r in caplog.records if r.name == "fastagi.geo"]
        assert len(lines) == 1 and path in lines[0] and "without country rules" in lines[0]


def test_check_says_whether_the_database_is_usable(tmp_path, geo_db):
    env = {"FASTAGI_SERVER_RUNTIME_DIR": str(tmp_path / "run"), "FASTAGI_SCREENING_GEOIP_DB": ""}
    missing = str(tmp_path / "missing.mmdb")
    bad = ctl("check", env={**env, "FASTAGI_SCREENING_GEOIP_DB": missing})
    lines = [line for line in bad.stdout.splitlines() if "geoip" in line]
    assert len(lines) == 1 and lines[0].startswith("FAIL geoip") and missing in lines[0]
    assert "without country rules" in lines[0] and bad.returncode == 1
    rules = {f"FASTAGI_{key}": value for key, value in RULES.items()}
    good = ctl("check", env={**env, **rules, "FASTAGI_SCREENING_GEOIP_DB": geo_db})
    lines = [line for line in good.stdout.splitlines() if "geoip" in line]
    assert len(lines) == 1 and lines[0].startswith("ok   geoip") and "GeoLite2-Country" in lines[0]
    assert "deny CN" in lines[0] and "allow DE US (others: threshold 2)" in lines[0]
    assert not [line for line in ctl("check", env=env).stdout.splitlines() if "geoip" in line]


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("country_thresholds = { CN = 3 }", "screening.deny_countries: CN also in"),
        (
            'allow_countries = ["cn"]',
            "screening.deny_countries: CN also in screening.allow_countries",
        ),
        ('geoip_db = ""\ndeny_countries = ["CN"]', "screening.deny_countries: needs"),
    ],
)
def test_contradicting_country_rules_are_one_line_and_exit_2(toml, named, geo_db, tmp_path):
    """Rules that need each other or contradict (single bad values: the bad-input table)."""
    path = tmp_path / "fastagi.toml"
    if "geoip_db" not in toml:
        toml = f'geoip_db = {json.dumps(geo_db)}\ndeny_countries = ["CN"]\n{toml}'
    path.write_text(f"[screening]\n{toml}\n")
    done = ctl("--config", str(path), "check")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and named in done.stderr, done.stderr


def test_a_replaced_database_is_swapped_in_and_a_broken_one_is_not(tmp_path, caplog):
    import ipaddress
    import os

    from fastagi.geo import Countries, CountryRules

    path = write_db(tmp_path / "countries.mmdb")
    countries = Countries(GeoDB(path), CountryRules(deny=frozenset({"CN"})))
    caller = ipaddress.ip_address("198.51.100.9")
    assert countries.rule(caller) == ("CN", 1)
    # geoipupdate writes a new file and renames it over the old one
    write_db(tmp_path / "new.mmdb", {"198.51.100.0/24": "NL"})
    os.replace(tmp_path / "new.mmdb", path)
    countries._next_look = 0  # a minute later
    assert countries.rule(caller) == ("NL", None)
    (tmp_path / "broken.mmdb").write_bytes(b"half a download")
    os.replace(tmp_path / "broken.mmdb", path)
    countries._next_look = 0
    with caplog.at_level(logging.WARNING, logger="fastagi.geo"):
        assert countries.rule(caller) == ("NL", None)  # the database read before
    assert [r.getMessage() for r in caplog.records if "keeping the database" in r.getMessage()]
