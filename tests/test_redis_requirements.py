"""What fastagi-screen needs of a shared Redis, checked as an admin meets it:

- `fastagi-ctl check` warns (exit 0) when Redis keeps no data over a restart, says
  "ok" with `appendonly yes`, and says what it could not learn when CONFIG is renamed
  or CONFIG and INFO are denied to our user, instead of failing;
- `serve` and `agent` refuse a Redis older than the minimum (exit 1, one line), and
  `serve` logs one warning line at start for a Redis without persistence.

The old Redis is a stub speaking the protocol (a real 4.x server is not at hand).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from fastagi.store import MIN_REDIS
from tests.conftest import REDIS_SERVER, RedisProcess
from tests.harness import free_port
from tests.procs import Service, ctl

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def _check(url: str) -> tuple[int, list[str]]:
    proc = ctl("check", env={"FASTAGI_REDIS_URL": url})
    return proc.returncode, [line for line in proc.stdout.splitlines() if "store" in line]


@pytest.fixture
def redis_with(tmp_path) -> Iterator:
    """Start a redis-server of this test's own with extra options."""
    started: list[RedisProcess] = []

    def start(*options: str) -> RedisProcess:
        server = RedisProcess(tmp_path, extra=options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def test_check_warns_about_a_redis_without_persistence(redis_with):
    code, lines = _check(redis_with().url)
    assert code == 0, lines
    warning = [line for line in lines if line.startswith("warn")]
    assert len(warning) == 1 and "Redis has no persistence" in warning[0], lines
    assert "appendonly yes" in warning[0]
    assert any(line.startswith("ok   store: Redis 7") for line in lines), lines


def test_check_warns_about_snapshots_only(redis_with):
    code, lines = _check(redis_with("--save", "3600 1").url)
    assert code == 0
    assert any(line.startswith("warn store: Redis keeps snapshots only") for line in lines), lines


def test_check_is_happy_with_appendonly(redis_with):
    code, lines = _check(redis_with("--appendonly", "yes", "--appendfsync", "everysec").url)
    assert code == 0
    assert "ok   store: persistence: appendonly yes, appendfsync everysec" in lines, lines
    assert not any(line.startswith("warn") for line in lines), lines


def test_check_with_config_renamed_reads_info(redis_with):
    code, lines = _check(redis_with("--rename-command", "CONFIG", "").url)
    assert code == 0
    warning = [line for line in lines if line.startswith("warn")]
    assert len(warning) == 1, lines
    assert "Redis has no persistence (appendonly no; CONFIG GET refused" in warning[0]


def test_check_with_config_and_info_denied_says_so(redis_with):
    server = redis_with()
    server.client().execute_command(
        "ACL", "SETUSER", "screen", "on", ">secret", "~*", "&*", "+@all", "-config", "-info"
    )
    code, lines = _check(f"redis://screen:secret@127.0.0.1:{server.port}/0")
    assert code == 0, lines
    assert any(line.startswith("warn store: Redis version unknown (INFO refused") for line in lines)
    assert any("cannot tell whether Redis keeps its data" in line for line in lines), lines


def test_serve_warns_at_start_about_a_redis_without_persistence(redis_with, tmp_path):
    log = tmp_path / "serve.log"
    with Service({"FASTAGI_REDIS_URL": redis_with().url}, "--no-agent", log=log):
        pass
    warnings = [line for line in log.read_text().splitlines() if "no persistence" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], log.read_text()


class _OldRedis(socketserver.ThreadingTCPServer):
    """Answers PING, INFO and CONFIG GET like an old Redis: a 5.0 refuses HELLO (RESP3)
    as every Redis before 6.0 does; "hello" knows it but reports version 5.0.14."""

    daemon_threads = True
    allow_reuse_address = True
    knows_hello = False


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


class _OldRedisHandler(socketserver.StreamRequestHandler):
    def _command(self) -> list[bytes] | None:
        header = self.rfile.readline()
        if not header.startswith(b"*"):
            return None
        parts = []
        for _ in range(int(header[1:])):
            size = int(self.rfile.readline()[1:])
            parts.append(self.rfile.read(size + 2)[:-2])
        return parts

    def handle(self) -> None:
        while (command := self._command()) is not None:
            name = command[0].upper()
            if name == b"HELLO" and self.server.knows_hello:
                reply = b"%1\r\n+proto\r\n:3\r\n"
            elif name == b"PING":
                reply = b"+PONG\r\n"
            elif name == b"INFO":
                reply = _bulk(b"# Server\r\nredis_version:5.0.14\r\n")
            elif name == b"CONFIG":
                value = b"yes" if command[2] == b"appendonly" else b""
                reply = b"%1\r\n" + _bulk(command[2]) + _bulk(value)
            else:  # Redis 5's own words
                reply = b"-ERR unknown command `%s`, with args beginning with: \r\n" % command[0]
            self.wfile.write(reply)


@pytest.fixture(params=["5.0", "hello"])
def old_redis(request) -> Iterator[str]:
    server = _OldRedis(("127.0.0.1", free_port()), _OldRedisHandler)
    server.knows_hello = request.param == "hello"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("command", [["serve", "--no-agent"], ["agent"]])
def test_a_redis_older_than_the_minimum_is_refused(old_redis, tmp_path, command):
    port = free_port()
    env = {
        "FASTAGI_REDIS_URL": old_redis,
        "FASTAGI_SERVER_LISTEN": f"127.0.0.1:{port}",
        "FASTAGI_RUNTIME_DIR": str(tmp_path),
    }
    proc = ctl(*command, env=env, timeout=20)
    minimum = ".".join(map(str, MIN_REDIS))
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "fastagi-ctl:" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastagi-ctl: Redis ")
    assert f"needs Redis {minimum} or later" in lines[0]
    assert "Traceback" not in proc.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing serves


def test_check_fails_on_a_redis_older_than_the_minimum(old_redis):
    code, lines = _check(old_redis)
    assert code == 1
    fail = [line for line in lines if line.startswith("FAIL store: Redis")]
    assert len(fail) == 1 and "6.0" in fail[0], lines
