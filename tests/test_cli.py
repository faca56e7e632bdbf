"""fastagi-ctl as an admin uses it: exit codes 0/1/2, one-line errors, two shells."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.harness import free_port
from tests.procs import Service, ctl


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def embedded(tmp_path):
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path / "run"),
        "FASTAGI_SCREENING_THRESHOLD": "3",
        "FASTAGI_SCREENING_PBX_ID": "pbx-a",
    }
    with Service(env, log=tmp_path / "serve.log") as service:
        yield service


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["ban", "1.2.3"], "not an IP address"),
        (["ban", "203.0.113.5", "--for", "ten minutes"], "--for"),
        (["ban", "127.0.0.9"], "screening.ignore"),
        (["ban", "::1"], "screening.ignore"),
        (["unban"], "--all"),
        (["unban", "203.0.113.5", "garbage"], "not an IP address"),
        (["ban", "203.0.113.5", "--hold", "two words"], "--hold"),
        (["unban", "203.0.113.5", "--hold", ""], "--hold"),
        (["unban", "203.0.113.5", "--hold", "f2b\x1b[2J"], "--hold"),
        (["status", "999.1.1.1"], "not an IP address"),
        (["simulate", "--ip", "nope"], "--ip"),
        (["serve", "--firewall", "pf"], "--firewall: unknown backend 'pf'"),
        (["serve", "--listen", "localhost"], "--listen"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, fragment, tmp_path):
    result = ctl(*args, env={"FASTAGI_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert fragment in _one_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "toml,fragment",
    [
        ("[screening]\nthreshold = 'abc'\n", "screening.threshold"),
        ("[screening]\nwindow = '10 minutes'\n", "screening.window"),
        ("[screening]\nignore = ['10.0.0.0/33']\n", "screening.ignore"),
        ("[screening]\nmaxretry = 3\n", "screening.maxretry: unknown key"),
        ("[jail]\nx = 1\n", "[jail]: unknown section"),
        ("[redis]\nurl = 'http://x'\n", "redis.url"),
        ("[server]\nmax_sessions = 0\n", "server.max_sessions"),
        ("[firewall]\nports = ['5060/sctp']\n", "firewall.ports"),
        ("not toml at all = = =\n", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(toml, fragment, tmp_path):
    path = tmp_path / "fastagi.toml"
    path.write_text(toml)
    result = ctl("--config", str(path), "status")
    assert result.returncode == 2
    assert fragment in _one_line(result)


def test_bad_environment_override_names_the_variable(tmp_path):
    result = ctl("status", env={"FASTAGI_SCREENING_BAN_TIME": "forever"})
    assert result.returncode == 2
    assert "FASTAGI_SCREENING_BAN_TIME" in _one_line(result)


def test_unreachable_redis_exits_1_with_one_line():
    url = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["status"], ["ban", "203.0.113.5"], ["unban", "203.0.113.5"]):
        result = ctl(*args, env={"FASTAGI_REDIS_URL": url})
        assert result.returncode == 1
        assert "Redis" in _one_line(result)
    check = ctl("check", env={"FASTAGI_REDIS_URL": url})
    assert check.returncode == 1 and "FAIL store" in check.stdout


def test_no_running_embedded_service_exits_1(tmp_path):
    result = ctl("status", env={"FASTAGI_RUNTIME_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "fastagi-ctl serve" in _one_line(result)


def test_embedded_mode_across_shells(embedded):
    env = embedded.env
    sim = ctl("simulate", "--ip", "203.0.113.40", "--calls", "2", env=env)
    assert sim.returncode == 0, sim.stderr
    assert "SCREEN_RESULT=COUNTED" in sim.stdout and "SCREEN_COUNT=2" in sim.stdout
    assert ctl("ban", "203.0.113.41", "--for", "10m", "--reason", "manual", env=env).returncode == 0
    status = ctl("status", "--json", env=env)
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert report["counted"]["list"] == [{"ip": "203.0.113.40", "count": 2}]
    assert [b["ip"] for b in report["banned"]["list"]] == ["203.0.113.41"]
    assert report["banned"]["list"][0]["reason"] == "manual"
    plain = ctl("status", env=env).stdout
    assert "Currently banned: 1" in plain and "203.0.113.41" in plain
    assert ctl("check", env=env).returncode == 0


def test_unban_lifts_the_ban_and_resets_the_count(embedded):
    env = embedded.env
    ctl("simulate", "--ip", "203.0.113.42", "--calls", "4", env=env)
    before = json.loads(ctl("status", "203.0.113.42", "--json", env=env).stdout)
    assert before["banned"] is True
    ctl("simulate", "--ip", "203.0.113.43", "--calls", "2", env=env)
    assert json.loads(ctl("status", "203.0.113.43", "--json", env=env).stdout)["count"] == 2
    result = ctl("unban", "203.0.113.42", "203.0.113.43", env=env)
    assert result.returncode == 0
    assert "203.0.113.42 unbanned" in result.stdout
    after = json.loads(ctl("status", "--json", env=env).stdout)
    assert after["banned"]["current"] == 0 and after["counted"]["current"] == 0
    again = ctl("simulate", "--ip", "203.0.113.42", env=env)
    assert "SCREEN_COUNT=1" in again.stdout and "SCREEN_RESULT=COUNTED" in again.stdout


def test_unban_all_and_ipv6(embedded):
    env = embedded.env
    for ip in ("2001:db8::41", "[2001:db8::42]:5060", "2001:db8:0:1::7", "203.0.113.44"):
        assert ctl("ban", ip, env=env).returncode == 0
    report = json.loads(ctl("status", "--json", env=env).stdout)
    assert sorted(b["ip"] for b in report["banned"]["list"]) == [  # one ban per IPv6 /64
        "2001:db8:0:1::/64",
        "2001:db8::/64",
        "203.0.113.44",
    ]
    result = ctl("unban", "--all", env=env)
    assert result.returncode == 0 and "3 bans lifted" in result.stdout
    assert json.loads(ctl("status", "--json", env=env).stdout)["banned"]["current"] == 0


def test_a_short_ban_from_another_source_keeps_the_long_one(embedded):
    """The observed bug: `ban --for 1w` then fail2ban's 60 s ban left a 60 s ban."""
    env = embedded.env
    assert ctl("ban", "203.0.113.45", "--for", "1w", env=env).returncode == 0
    jail = ["--hold", "f2b-asterisk"]
    short = ctl("ban", "203.0.113.45", "--for", "60s", "--reason", "f2b-asterisk", *jail, env=env)
    assert short.returncode == 0 and "a longer hold keeps the ban" in short.stdout
    report = json.loads(ctl("status", "203.0.113.45", "--json", env=env).stdout)
    assert report["until"] - time.time() > 6.9 * 86400
    assert [(h["source"], h["reason"]) for h in report["holds"]] == [
        ("admin", "manual"),
        ("f2b-asterisk", "f2b-asterisk"),
    ]
    plain = ctl("status", "203.0.113.45", env=env).stdout
    assert re.search(
        r"\|- admin until .* \(manual\)\n\|  `- f2b-asterisk until .* \(f2b-asterisk\)", plain
    )
    lifted = ctl("unban", "203.0.113.45", *jail, env=env).stdout
    assert "hold f2b-asterisk lifted; other holds keep it banned until" in lifted
    assert "had no hold f2b-asterisk" in ctl("unban", "203.0.113.45", *jail, env=env).stdout
    assert "203.0.113.45 unbanned" in ctl("unban", "203.0.113.45", env=env).stdout
    assert json.loads(ctl("status", "203.0.113.45", "--json", env=env).stdout)["holds"] == []


def test_control_characters_in_reasons_never_reach_the_terminal(redis_server, redis_url):
    """`ban --reason` stores them escaped; text another host wrote raw into Redis is
    escaped when `status` prints it."""
    env = {"FASTAGI_REDIS_URL": redis_url}
    reason = "x\n198.51.100.66 until never\x1b[2J\u2028é"
    assert ctl("ban", "198.51.100.65", "--reason", reason, env=env).returncode == 0
    assert ctl("ban", "198.51.100.66", env=env).returncode == 0
    redis_server.client().hset("fastagi:{screen}:record:198.51.100.66", "reason", "y\r\nz\x07")
    plain = ctl("status", env=env).stdout + ctl("status", "198.51.100.65", env=env).stdout
    plain += ctl("status", "198.51.100.66", env=env).stdout
    assert not any(c in plain for c in "\r\x1b\x07\u2028")
    assert r"x\n198.51.100.66 until never\x1b[2J\u2028é" in plain
    assert r"y\r\nz\x07" in plain
    assert "\n198.51.100.66 until never" not in plain  # no forged line
    stored = json.loads(ctl("status", "198.51.100.65", "--json", env=env).stdout)
    assert stored["holds"][0]["reason"] == r"x\n198.51.100.66 until never\x1b[2J\u2028é"[:64]


def test_status_on_a_real_redis(redis_url):
    env = {"FASTAGI_REDIS_URL": redis_url}
    assert ctl("ban", "198.51.100.9", "--for", "1h", env=env).returncode == 0
    report = json.loads(ctl("status", "--json", env=env).stdout)
    assert report["banned"]["list"][0]["ip"] == "198.51.100.9"
    assert report["banned"]["total"] == 1


def test_the_running_service_logs_each_call_within_a_moment(embedded):
    """INFO lines are batched (fastagi/logs.py), yet a tail -f sees them at once."""
    ctl("simulate", "--ip", "203.0.113.44", "--calls", "3", env=embedded.env)
    deadline = time.monotonic() + 2
    wanted = "failed for 203.0.113.44 - Unknown connection from peer"
    while time.monotonic() < deadline:
        lines = embedded.log.read_text().splitlines()
        if sum(wanted in line for line in lines) == 3:
            break
        time.sleep(0.02)
    notices = [line for line in lines if wanted in line]
    assert len(notices) == 3
    assert re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO fastagi.screening: Ext\. ", notices[0]
    )
    assert any(" WARNING fastagi.server: 203.0.113.44 banned until " in line for line in lines)
