"""`fastagi-ctl serve` with `[auth] enabled`, `watch`, `status`, `check` and /metrics as
real processes, against the AMI emulator as a process (`python -m fastagi.ami_emulator`)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.harness import free_port
from tests.procs import Service, _env, ctl

ATTACKER = "192.0.2.90"


@contextlib.contextmanager
def emulated_ami(*failures: str, secret: str = "s3cret") -> Iterator[int]:
    """The AMI emulator as a process; after the first login it sends one
    ChallengeResponseFailed per address in `failures`."""
    port = free_port()
    argv = [sys.executable, "-m", "fastagi.ami_emulator", "--listen", f"127.0.0.1:{port}"]
    argv += ["--secret", secret]
    for address in failures:
        argv += ["--failure-from", address]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=_env(None))
    try:
        assert proc.stdout is not None and "fake AMI" in proc.stdout.readline()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def auth_env(port: int, tmp_path: Path, **more: str) -> dict[str, str]:
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path / "run"),
        "FASTAGI_AUTH_ENABLED": "true",
        "FASTAGI_AUTH_PORT": str(port),
        "FASTAGI_AUTH_USERNAME": "fastagi",
        "FASTAGI_AUTH_SECRET": "s3cret",
        "FASTAGI_AUTH_THRESHOLD": "3",
    }
    env.update(more)
    return env


def status(env: dict[str, str]) -> dict:
    proc = ctl("status", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_status(env: dict[str, str], predicate, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        seen = status(env)
        if predicate(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_serve_counts_and_bans_password_guessing(tmp_path: Path) -> None:
    metrics_port = free_port()
    with emulated_ami(ATTACKER, ATTACKER, "192.0.2.91") as port:
        env = auth_env(port, tmp_path, FASTAGI_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
        with Service(env, log=tmp_path / "serve.log") as service:
            seen = wait_status(service.env, lambda s: s["auth"]["failures"] == 3)
            assert seen["auth"]["list"] == [
                {"ip": ATTACKER, "count": 2},
                {"ip": "192.0.2.91", "count": 1},
            ]
            text = ctl("status", env=service.env).stdout
            assert "Password guessing (AMI, on)" in text and f"{ATTACKER}(2)" in text
            one = json.loads(ctl("status", ATTACKER, "--json", env=service.env).stdout)
            assert one["auth_failures"] == 2 and one["count"] == 0
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
            metrics = body.decode()
            assert (
                'fastagi_auth_events_total{event="ChallengeResponseFailed",outcome="counted"} 3.0'
                in metrics
            )
            assert "fastagi_auth_ami_connected 1.0" in metrics
            assert "fastagi_cluster_auth_failures_total 3.0" in metrics
            check = ctl("check", env=service.env)
        log = (tmp_path / "serve.log").read_text()
    assert "AMI 127.0.0.1" in log and "logged in as fastagi" in log
    assert "Traceback" not in log
    assert check.returncode == 0, check.stdout
    assert "action Command refused" in check.stdout


def test_serve_with_a_dead_ami_serves_and_says_so_once(tmp_path: Path) -> None:
    env = auth_env(free_port(), tmp_path)  # nobody listens there
    with Service(env, log=tmp_path / "serve.log") as service:
        answer = ctl("simulate", "--ip", "192.0.2.7", env=service.env)
        assert "SCREEN_RESULT=COUNTED" in answer.stdout, answer.stdout + answer.stderr
        time.sleep(3.5)  # backoff 1 s, 2 s: three connection attempts
        check = ctl("check", env=service.env)
    log = (tmp_path / "serve.log").read_text()
    assert log.count("retrying every") == 1, log
    assert check.returncode == 1 and "FAIL auth: AMI 127.0.0.1" in check.stdout


def test_watch_alone_counts_into_redis(tmp_path: Path, redis_url: str) -> None:
    with emulated_ami(ATTACKER, ATTACKER, ATTACKER) as port:
        env = auth_env(port, tmp_path, FASTAGI_REDIS_URL=redis_url)
        log = open(tmp_path / "watch.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastagi.cli", "watch"], env=_env(env), stdout=log, stderr=log
        )
        log.close()
        try:
            seen = wait_status(env, lambda s: s["banned"]["current"] == 1)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(10)
    assert code == 0, (tmp_path / "watch.log").read_text()
    assert [(b["ip"], b["reason"]) for b in seen["banned"]["list"]] == [(ATTACKER, "auth")]


def test_watch_without_auth_enabled_exits_2(tmp_path: Path) -> None:
    proc = ctl("watch", env={"FASTAGI_RUNTIME_DIR": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "auth.enabled" in proc.stderr


def test_unban_resets_the_auth_count_too(tmp_path: Path) -> None:
    with emulated_ami(ATTACKER, ATTACKER) as port:
        env = auth_env(port, tmp_path)
        with Service(env) as service:
            wait_status(service.env, lambda s: s["auth"]["failures"] == 2)
            assert ctl("unban", ATTACKER, env=service.env).returncode == 0
            assert status(service.env)["auth"]["list"] == []


def test_serve_refuses_an_unreadable_credential_with_exit_2(tmp_path: Path) -> None:
    """The secret file is read at start: a missing credential is one line and exit 2,
    not a watcher failing at every reconnect."""
    env = auth_env(
        free_port(),
        tmp_path,
        FASTAGI_AUTH_SECRET="",
        FASTAGI_AUTH_SECRET_FILE="${CREDENTIALS_DIRECTORY}/ami-secret",
        CREDENTIALS_DIRECTORY=str(tmp_path / "nothing-here"),
        FASTAGI_SERVER_LISTEN=f"127.0.0.1:{free_port()}",
    )
    proc = ctl("serve", env=env, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "auth.secret_file" in proc.stderr and "Traceback" not in proc.stderr


def test_the_shipped_manager_user_reads_security_only() -> None:
    text = (Path(__file__).parent.parent / "deploy/asterisk/manager-fastagi.conf").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(";")
    )
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    assert settings["read"] == "security" and "write" not in settings
    assert settings["permit"].startswith("127.0.0.1/") and settings["deny"] == "0.0.0.0/0.0.0.0"


def test_an_auth_ban_is_the_same_ban_for_guest_calls(tmp_path: Path) -> None:
    with (
        emulated_ami(ATTACKER, ATTACKER, ATTACKER) as port,
        Service(auth_env(port, tmp_path)) as service,
    ):
        seen = wait_status(service.env, lambda s: s["banned"]["current"] == 1)
        call = ctl("simulate", "--ip", ATTACKER, env=service.env)
    assert [(b["ip"], b["reason"], b["bans"]) for b in seen["banned"]["list"]] == [
        (ATTACKER, "auth", 1)
    ]
    assert "SCREEN_RESULT=BANNED" in call.stdout, call.stdout + call.stderr
