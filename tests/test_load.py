"""Load: 1,000 concurrent sessions plus 1,000 idle connections against `fastagi-ctl
serve` (a real process, real Redis) for FASTAGI_LOAD_SECONDS (default 60; the whole
test stays under 90 s). No error beyond max_sessions refusals, RSS bounded, file
descriptors back to the baseline afterwards.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from pathlib import Path

import pytest

from fastagi.emulator import Call, FakeAsterisk
from tests.procs import Service

LOAD_SECONDS = float(os.environ.get("FASTAGI_LOAD_SECONDS", "60"))
SESSIONS = int(os.environ.get("FASTAGI_LOAD_SESSIONS", "1000"))
IDLE = int(os.environ.get("FASTAGI_LOAD_IDLE", "1000"))
SESSION_TIMEOUT = 5.0
# Room for every caller and every idle connection at once: nothing is refused. Since
# the screening steps share one Redis connection (redis_link.py) this holds even with
# two CPU hogs beside the test on a 2-CPU box (0 refused, 0 fail-open, max call 2.8 s);
# through redis-py's pool, 1,000 steps queued for 64 connections and ~1,000 calls
# failed open at the 0.75 s Redis budget, so the test had to shed load at 1,128.
MAX_SESSIONS = int(os.environ.get("FASTAGI_LOAD_MAX_SESSIONS", str(IDLE + SESSIONS + 100)))
# Measured by the emulator, so it includes the accept queue and this process's own
# loop lag on top of the server's session_timeout.
CLIENT_SLACK = 1.0
RSS_LIMIT_MB = 400


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.mark.slow
def test_1000_sessions_and_1000_idle_connections(redis_url, tmp_path):
    # This process holds both ends' fds for the clients; the service inherits the limit.
    _raise_nofile(4 * (SESSIONS + IDLE) + 1024)
    env = {
        "FASTAGI_REDIS_URL": redis_url,
        "FASTAGI_SERVER_MAX_SESSIONS": str(MAX_SESSIONS),
        "FASTAGI_SERVER_SESSION_TIMEOUT": f"{SESSION_TIMEOUT}s",
        "FASTAGI_SCREENING_IGNORE": "",
        "FASTAGI_SCREENING_PBX_ID": "load",
        "FASTAGI_LOG_LEVEL": "ERROR",
        "FASTAGI_RUNTIME_DIR": str(tmp_path / "run"),
    }
    with Service(env, log=tmp_path / "serve.log") as service:
        pid = service.proc.pid
        report = asyncio.run(_load(service, pid))
        assert service.proc.poll() is None, "the service died under load"
    print(
        f"\nload: {report['seconds']:.0f}s, {report['calls']} calls "
        f"({report['calls'] / report['seconds']:.0f}/s) by {SESSIONS} concurrent callers + "
        f"{IDLE} idle connections ({report['idle_opened']} opened); results "
        f"{report['results']}; refused {report['refused']}; fail-open {report['fail_open']}; "
        f"max call {report['max_call']:.2f}s;"
        f" RSS {report['rss_base']:.0f} -> max {report['rss_max']:.0f} MB; fds "
        f"{report['fd_base']} -> max {report['fd_max']} -> {report['fd_after']} after"
    )
    assert report["errors"] == [], report["errors"][:5]
    assert report["calls"] > SESSIONS
    assert report["fail_open"] == 0, "calls failed open although Redis was healthy"
    assert report["max_call"] < SESSION_TIMEOUT + CLIENT_SLACK
    assert report["rss_max"] < RSS_LIMIT_MB
    assert report["fd_max"] >= report["fd_base"] + IDLE // 2  # the load really reached it
    assert report["fd_after"] <= report["fd_base"] + 8


async def _load(service: Service, pid: int) -> dict:
    emulator = FakeAsterisk(hold_limit=SESSION_TIMEOUT + 5)
    results: dict[str, int] = {}
    errors: list[str] = []
    state = {"calls": 0, "refused": 0, "max_call": 0.0, "idle_opened": 0, "fail_open": 0}

    # Warm up: fill the Redis pool (up to 64 connections) before the fd baseline.
    await asyncio.gather(
        *(emulator.call(service.target, Call(source=f"198.19.{i}.1")) for i in range(200))
    )
    await asyncio.sleep(0.5)
    fd_base, rss_base = _fds(pid), _rss_mb(pid)
    stop = time.monotonic() + LOAD_SECONDS
    samples = {"rss": rss_base, "fds": fd_base}

    async def caller(worker: int) -> None:
        n = 0
        while time.monotonic() < stop and n < 100_000:
            # public-looking sources: a private one may be this host's own (protected)
            ip = f"198.{18 + worker // 250}.{worker % 250}.{n // 5 % 250 + 1}"
            n += 1
            started = time.monotonic()
            try:
                result = await emulator.call(service.target, Call(source=ip))
            except ConnectionResetError:
                # Refused at max_sessions: the server's one-line answer and close raced
                # our environment block.
                state["refused"] += 1
                await asyncio.sleep(0.25)
                continue
            except OSError as error:
                errors.append(f"connect: {error!r}")
                await asyncio.sleep(0.1)
                continue
            state["max_call"] = max(state["max_call"], time.monotonic() - started)
            state["calls"] += 1
            verdict = result.variables.get("SCREEN_RESULT", "none")
            if verdict == "ERROR" and result.variables.get("SCREEN_ERROR") == "busy":
                state["refused"] += 1  # max_sessions: answered and closed at once
                await asyncio.sleep(0.25)  # the next INVITE, not a busy loop
                continue
            results[verdict] = results.get(verdict, 0) + 1
            if verdict == "ERROR" and result.variables.get("SCREEN_ERROR") == "store unavailable":
                state["fail_open"] += 1  # answered in time but not counted: an error here
            elif verdict not in ("COUNTED", "BANNED"):
                errors.append(f"{ip}: {result.variables} {result.agistatus}")

    async def idle() -> None:
        host, port = "127.0.0.1", service.port
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as error:
                errors.append(f"idle connect: {error}")
                await asyncio.sleep(0.5)
                continue
            state["idle_opened"] += 1
            opened = time.monotonic()
            try:  # says nothing; the server ends it at session_timeout
                await asyncio.wait_for(reader.read(), max(0.1, stop - time.monotonic()))
            except (TimeoutError, OSError):
                pass
            finally:
                writer.close()
            if time.monotonic() - opened < 1:  # refused at max_sessions: try again later
                await asyncio.sleep(0.5)

    async def sampler() -> None:
        while time.monotonic() < stop:
            samples["rss"] = max(samples["rss"], _rss_mb(pid))
            samples["fds"] = max(samples["fds"], _fds(pid))
            await asyncio.sleep(0.5)

    started = time.monotonic()
    idlers = [asyncio.create_task(idle()) for _ in range(IDLE)]
    await asyncio.sleep(0.5)  # the idle ones first, then the callers on top
    await asyncio.gather(sampler(), *(caller(w) for w in range(SESSIONS)), *idlers)
    seconds = time.monotonic() - started
    # After the load: every connection closed; the service's fds return to the baseline.
    fd_after = _fds(pid)
    for _ in range(100):
        if fd_after <= fd_base + 8:
            break
        await asyncio.sleep(0.1)
        fd_after = _fds(pid)
    return {
        "seconds": seconds,
        "calls": state["calls"],
        "results": results,
        "errors": errors,
        "refused": state["refused"],
        "fail_open": state["fail_open"],
        "max_call": state["max_call"],
        "idle_opened": state["idle_opened"],
        "rss_base": rss_base,
        "rss_max": samples["rss"],
        "fd_base": fd_base,
        "fd_max": samples["fds"],
        "fd_after": fd_after,
    }
