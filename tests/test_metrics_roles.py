"""One config, two roles: `serve --no-agent` and `agent` read the same fastagi.toml on a PBX
(the packaged units do), so each has its own /metrics address, and a taken address stops a
service with exit code 2 (RestartPreventExitStatus=2) and one line instead of a restart loop.
Real processes, a real Redis."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness import free_port, wait_for
from tests.procs import Service, _env, ctl


def write_config(path: Path, redis_url: str, listen: str, agent_listen: str) -> Path:
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\n'
        '[screening]\npbx_id = "pbx-roles"\n'
        '[firewall]\nbackend = "dry-run"\nsync_interval = "1s"\n'
        f'[metrics]\nlisten = "{listen}"\nagent_listen = "{agent_listen}"\n',
        encoding="utf-8",
    )
    return path


def start_agent(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fastagi.cli", "agent"], env=_env(env), stdout=out, stderr=out
        )


def metrics_text(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            return answer.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return ""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def test_serve_and_agent_run_from_one_config_each_with_its_metrics(tmp_path, redis_url):
    serve_port, agent_port = free_port(), free_port()
    config = write_config(
        tmp_path / "fastagi.toml", redis_url, f"127.0.0.1:{serve_port}", f"127.0.0.1:{agent_port}"
    )
    env = {"FASTAGI_CONFIG": str(config), "FASTAGI_RUNTIME_DIR": str(tmp_path / "run")}
    with Service(env, "--no-agent", log=tmp_path / "serve.log"):
        assert ctl("ban", "203.0.113.61", env=env).returncode == 0
        agent = start_agent(env, tmp_path / "agent.log")
        try:
            applied = 'fastagi_firewall_set_size{backend="dry-run",pbx_id="pbx-roles"} 1.0'
            assert wait_for(lambda: applied in metrics_text(agent_port), 20), (
                tmp_path / "agent.log"
            ).read_text()
            assert agent.poll() is None
            # serve's own series on its address; the agent's are not there (no agent in it)
            served = metrics_text(serve_port)
            assert "fastagi_bans_issued_total" in served
            assert "fastagi_firewall_set_size{" not in served
        finally:
            stop(agent)


def test_with_only_listen_set_the_agent_runs_without_metrics(tmp_path, redis_url):
    """The layout of the bug report: `listen` set, both units on one host."""
    serve_port = free_port()
    config = write_config(tmp_path / "fastagi.toml", redis_url, f"127.0.0.1:{serve_port}", "")
    env = {"FASTAGI_CONFIG": str(config), "FASTAGI_RUNTIME_DIR": str(tmp_path / "run")}
    log = tmp_path / "agent.log"
    with Service(env, "--no-agent", log=tmp_path / "serve.log"):
        assert ctl("ban", "203.0.113.62", env=env).returncode == 0
        agent = start_agent(env, log)
        try:
            applied = "reconciled (full): 1 bans on dry-run"
            assert wait_for(lambda: applied in log.read_text(), 20), log.read_text()
            assert agent.poll() is None
            assert "agent: no /metrics of its own" in log.read_text()
        finally:
            stop(agent)


def test_a_taken_metrics_address_is_exit_2_with_one_line_for_either_role(tmp_path, redis_url):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        config = write_config(tmp_path / "fastagi.toml", redis_url, taken, taken)
        env = _env({"FASTAGI_CONFIG": str(config), "FASTAGI_RUNTIME_DIR": str(tmp_path / "run")})
        for role, key in (("agent", "agent_listen"), ("serve", "listen")):
            args = [role, "--no-agent"] if role == "serve" else [role]
            extra = {"FASTAGI_SERVER_LISTEN": f"127.0.0.1:{free_port()}"}
            proc = subprocess.run(
                [sys.executable, "-m", "fastagi.cli", *args],
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=30,
            )
            errors = [line for line in proc.stderr.splitlines() if "fastagi-ctl:" in line]
            assert proc.returncode == 2, (role, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert errors == [
                f"fastagi-ctl: metrics.{key}: cannot listen on {taken}: Address already in use"
                " (serve and agent on one host need one each: listen, agent_listen)"
            ], proc.stderr
