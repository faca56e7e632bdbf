"""A real fail2ban-server with our jail and action feeds the shared ban list (real Redis):
its bans are the jail's own holds, so its unban never lifts an admin's or a threshold ban."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastagi.service import make_store
from fastagi.store import redis_client
from tests.harness import settings
from tests.procs import ctl

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "fail2ban"
SERVER = shutil.which("fail2ban-server")
CLIENT = shutil.which("fail2ban-client")
pytestmark = pytest.mark.skipif(
    SERVER is None or CLIENT is None,
    reason="fail2ban is not installed (apt-get install fail2ban)",
)
JAIL = "asterisk-e2e"


def _fastagi_ctl() -> str:
    beside = Path(sys.executable).parent / "fastagi-ctl"
    return str(beside) if beside.exists() else shutil.which("fastagi-ctl") or "fastagi-ctl"


def _line(ip: str) -> str:
    stamp = time.strftime("%b %e %T")
    return (
        f"[{stamp}] NOTICE[28502] chan_sip.c: Registration from '<sip:100@127.0.0.1>' "
        f"failed for '{ip}:5060' - Wrong password\n"
    )


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _banned(env: dict[str, str]) -> list[str]:
    result = ctl("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return sorted(ban["ip"] for ban in json.loads(result.stdout)["banned"]["list"])


def _holds(env: dict[str, str], ip: str) -> dict[str, float]:
    """`status IP --json`: source -> end of each hold."""
    result = ctl("status", ip, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {hold["source"]: hold["until"] for hold in json.loads(result.stdout)["holds"]}


def _threshold_ban(redis_url: str, ip: str) -> float:
    """Calls from `ip` up to the threshold, as the FastAGI `screen` route counts them."""

    async def main() -> float:
        config = settings(redis_url)
        store = make_store(config, redis_client(config.redis))
        try:
            for _ in range(config.screening.threshold):
                verdict = await store.screen(ip)
        finally:
            await store.close()
        assert verdict.new_ban
        return verdict.ban_until

    return asyncio.run(main())


def test_fail2ban_bans_reach_the_shared_list_and_its_unban_lifts_only_its_own_hold(
    tmp_path, redis_url
):
    conf = tmp_path / "conf"
    for part in ("filter.d", "action.d"):
        shutil.copytree(DEPLOY / part, conf / part)
    fastagi_toml = tmp_path / "fastagi.toml"
    fastagi_toml.write_text(f'[redis]\nurl = "{redis_url}"\n')
    log = tmp_path / "asterisk-messages"
    log.write_text("")
    sock, pid = tmp_path / "f2b.sock", tmp_path / "f2b.pid"
    (conf / "fail2ban.conf").write_text(
        "[Definition]\nloglevel = INFO\n"
        f"logtarget = {tmp_path / 'fail2ban.log'}\nsocket = {sock}\npidfile = {pid}\n"
        "dbfile = :memory:\n"
    )
    (conf / "jail.conf").write_text(
        f"[{JAIL}]\nenabled = true\nfilter = asterisk-fastagi[mode=logs]\n"
        f"logpath = {log}\nbackend = polling\nmaxretry = 2\nfindtime = 600\nbantime = 600\n"
        f"action = fastagi[fastagi_ctl={_fastagi_ctl()}, fastagi_config={fastagi_toml}]\n"
    )
    server = subprocess.Popen(
        [SERVER, "-f", "-x", "-c", str(conf), "-s", str(sock), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {"FASTAGI_CONFIG": str(fastagi_toml)}
    try:
        ping = [CLIENT, "-c", str(conf), "-s", str(sock), "ping"]
        assert _wait(lambda: subprocess.run(ping, capture_output=True).returncode == 0)
        time.sleep(1.5)  # let the jail start following the (empty) log
        # .79: an admin's week-long ban first; .80: a threshold ban (an hour) first
        assert ctl("ban", "198.51.100.79", "--for", "1w", env=env).returncode == 0
        threshold_until = _threshold_ban(redis_url, "198.51.100.80")
        with log.open("a") as out:
            for ip in ("198.51.100.77", "198.51.100.78", *["198.51.100.79", "198.51.100.80"] * 2):
                out.write(_line(ip))
            out.write(_line("198.51.100.77"))
        jail = f"f2b-{JAIL}@{socket.gethostname()}"  # the action's hold: this jail on this host
        assert _wait(lambda: jail in _holds(env, "198.51.100.77"))
        assert _wait(
            lambda: all(jail in _holds(env, ip) for ip in ("198.51.100.79", "198.51.100.80"))
        )
        assert _banned(env) == ["198.51.100.77", "198.51.100.79", "198.51.100.80"]
        status = json.loads(ctl("status", "198.51.100.77", "--json", env=env).stdout)
        assert status["history"]["reason"] == f"f2b-{JAIL}"
        assert 590 <= status["until"] - time.time() <= 601
        assert set(_holds(env, "198.51.100.79")) == {"admin", jail}
        assert set(_holds(env, "198.51.100.80")) == {"threshold", jail}
        for ip in ("198.51.100.77", "198.51.100.79", "198.51.100.80"):
            unban = [CLIENT, "-c", str(conf), "-s", str(sock), "set", JAIL, "unbanip", ip]
            assert subprocess.run(unban, capture_output=True, timeout=30).returncode == 0
        assert _wait(lambda: _banned(env) == ["198.51.100.79", "198.51.100.80"])
        assert _wait(
            lambda: all(jail not in _holds(env, ip) for ip in ("198.51.100.79", "198.51.100.80"))
        )
        week = _holds(env, "198.51.100.79")
        assert list(week) == ["admin"] and week["admin"] - time.time() > 6.9 * 86400
        assert _holds(env, "198.51.100.80") == {"threshold": threshold_until}
        # an admin's unban lifts every hold
        assert ctl("unban", "198.51.100.79", "198.51.100.80", env=env).returncode == 0
        assert _banned(env) == []
    finally:
        subprocess.run(
            [CLIENT, "-c", str(conf), "-s", str(sock), "stop"], capture_output=True, timeout=30
        )
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    f2b_log = (tmp_path / "fail2ban.log").read_text()
    assert "Ban 198.51.100.77" in f2b_log
    assert "Ban 198.51.100.78" not in f2b_log  # one failure, below maxretry
