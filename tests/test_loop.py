"""The event loop never waits: not for a stuck stderr, not for the embedded store's
connections, not for idle /metrics clients. Real `fastagi-ctl serve` processes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.request
from collections import Counter

from fastagi.emulator import Call, FakeAsterisk
from tests.harness import free_port
from tests.procs import Service, ctl

SESSION_TIMEOUT = 3.0


def _calls(target: str, calls: list[Call], at_once: int, hold: float = SESSION_TIMEOUT + 2):
    """The calls, `at_once` of them concurrently, each held at most `hold` seconds."""

    async def main():
        asterisk = FakeAsterisk(hold_limit=hold)
        results = []
        for start in range(0, len(calls), at_once):
            batch = calls[start : start + at_once]
            results += await asyncio.gather(*(asterisk.call(target, c) for c in batch))
        return results

    return asyncio.run(main())


def test_a_stuck_stderr_neither_hangs_sessions_nor_stops_sigterm(tmp_path):
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path),
        "FASTAGI_SERVER_SESSION_TIMEOUT": f"{SESSION_TIMEOUT}s",
        "FASTAGI_SCREENING_THRESHOLD": "3",  # bans too: their warning lines queue up as well
    }
    with Service(env, stuck_stderr=True) as service:  # the agent in it logs too
        # First fill the pipe: 100 calls log far more than its one page, and the log
        # writer (a thread of its own, writing batches of lines) then waits on it with
        # what is unread. The calls that count run while nobody reads it.
        fill = [Call(source=f"203.0.113.{n % 50 + 1}") for n in range(100)]
        _calls(service.target, fill, at_once=10)
        for _ in range(50):
            if service.stderr_unread() > 0:
                break
            time.sleep(0.1)
        unread = service.stderr_unread()
        calls = [Call(source=f"198.51.100.{n % 100 + 1}") for n in range(400)]
        results = _calls(service.target, calls, at_once=20)
        started = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        code = service.proc.wait(10)
        stopped_after = time.monotonic() - started
    print(
        f"\nstuck stderr: {len(results)} calls, longest {max(r.seconds for r in results):.3f}s; "
        f"stopped {stopped_after:.2f}s after SIGTERM"
    )
    assert unread > 0  # lines sat unread in a one-page pipe: the writes after them waited
    outcomes = Counter(r.variables.get("SCREEN_RESULT", "(none)") for r in results)
    assert outcomes == {"COUNTED": 200, "BANNED": 200}, outcomes
    assert max(r.seconds for r in results) < SESSION_TIMEOUT
    assert code == 0 and stopped_after < 3


def test_150_concurrent_embedded_sessions_are_all_counted(tmp_path):
    env = {
        "FASTAGI_RUNTIME_DIR": str(tmp_path),
        "FASTAGI_SCREENING_THRESHOLD": "1000",
        # Time enough on a loaded machine: this is about connections, not latency.
        "FASTAGI_SERVER_SESSION_TIMEOUT": "20s",
        "FASTAGI_REDIS_TIMEOUT": "5s",
    }
    with Service(env, "--no-agent") as service:  # max_sessions: the default 256
        calls = [Call(source="203.0.113.77")] * 150
        results = _calls(service.target, calls, at_once=150, hold=25)
        status = ctl("status", "203.0.113.77", "--json", env=service.env)
    assert [r.variables.get("SCREEN_ERROR") for r in results] == [None] * 150
    counts = sorted(int(r.variables["SCREEN_COUNT"]) for r in results)
    assert counts == list(range(1, 151))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["count"] == 150


def test_1000_idle_metrics_connections_keep_the_thread_count_bounded(tmp_path):
    port = free_port()
    env = {"FASTAGI_RUNTIME_DIR": str(tmp_path), "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{port}"}
    with Service(env, "--no-agent") as service:
        before = service.threads()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
        try:
            time.sleep(0.5)  # let the service accept them all
            during = service.threads()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            after_scrape = service.threads()
        finally:
            for sock in idle:
                sock.close()
    print(f"\nthreads: {before} before, {during} with 1,000 idle /metrics connections")
    assert during <= before + 1 and after_scrape <= before + 2, (before, during, after_scrape)
    assert "fastagi_sessions_active" in text and "fastagi_log_lines_dropped_total 0.0" in text
