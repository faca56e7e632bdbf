"""Several PBXs on one real Redis: exact counts, one ban, survival of a Redis outage."""

from __future__ import annotations

import asyncio
import time

import redis

from fastagi.emulator import Call, FakeAsterisk
from fastagi.keys import Keys
from tests.harness import running_server
from tests.procs import Service


def test_two_servers_200_concurrent_sessions_make_exactly_one_ban(redis_url, tmp_path):
    # atomicity, not latency: a generous Redis budget so a loaded CI machine cannot fail it
    env = {
        "FASTAGI_REDIS_URL": redis_url,
        "FASTAGI_SCREENING_THRESHOLD": "50",
        "FASTAGI_REDIS_TIMEOUT": "1s",
        "FASTAGI_SERVER_MAX_SESSIONS": "512",
        "FASTAGI_SCREENING_PBX_ID": "pbx",
    }
    with (
        Service({**env, "FASTAGI_SCREENING_PBX_ID": "pbx1"}, "--no-agent") as one,
        Service({**env, "FASTAGI_SCREENING_PBX_ID": "pbx2"}, "--no-agent") as two,
    ):

        async def main():
            emulator = FakeAsterisk(hold_limit=20)
            calls = [
                emulator.call((one, two)[n % 2].target, Call(source="198.51.100.200"))
                for n in range(200)
            ]
            return await asyncio.gather(*calls)

        results = asyncio.run(main())
    errors = [r.variables for r in results if r.variables.get("SCREEN_RESULT") == "ERROR"]
    assert errors == []
    counts = sorted(int(r.variables["SCREEN_COUNT"]) for r in results)
    assert counts == list(range(1, 201))  # every call counted once, cluster-wide
    by_result = [r.variables["SCREEN_RESULT"] for r in results]
    assert by_result.count("COUNTED") == 49 and by_result.count("BANNED") == 151
    client = redis.Redis.from_url(redis_url)
    keys = Keys()
    events = client.xrange(keys.events)
    assert [e[1][b"op"] for e in events] == [b"ban"]
    assert client.zrange(keys.banned, 0, -1) == [b"198.51.100.200"]
    record = client.hgetall(keys.record("198.51.100.200"))
    assert record[b"bans"] == b"1" and record[b"count"] == b"200"
    assert record[b"pbx_id"] in (b"pbx1", b"pbx2")


def test_redis_stopped_mid_run_fails_open_fast_and_recovers_without_restart(own_redis):
    async def main():
        async with running_server(
            own_redis.url, SERVER_SESSION_TIMEOUT="2s", REDIS_TIMEOUT="200ms"
        ) as srv:
            before = await srv.call(Call(source="192.0.2.70"))
            own_redis.stop()
            outage = []
            for _ in range(5):
                started = time.monotonic()
                result = await srv.call(Call(source="192.0.2.70"))
                outage.append((result, time.monotonic() - started))
            own_redis.start()
            after = await srv.call(Call(source="192.0.2.70"))
            return before, outage, after

    before, outage, after = asyncio.run(main())
    assert before.variables["SCREEN_RESULT"] == "COUNTED"
    for result, seconds in outage:
        assert result.variables["SCREEN_RESULT"] == "ERROR"
        assert result.variables["SCREEN_ERROR"] == "store unavailable"
        assert result.variables["SCREEN_COUNTED"] == "unknown"  # the NOTICE is logged
        assert seconds < 2.0
    # the restarted Redis is empty (no persistence here): counting starts again at 1
    assert after.variables["SCREEN_RESULT"] == "COUNTED"
    assert after.variables["SCREEN_COUNT"] == "1"


def test_hung_redis_still_answers_asterisk_within_session_timeout(own_redis):
    """A Redis that accepts but never answers (SIGSTOP) must not hold the call."""

    async def main():
        async with running_server(
            own_redis.url, SERVER_SESSION_TIMEOUT="1500ms", REDIS_TIMEOUT="200ms"
        ) as srv:
            await srv.call(Call(source="192.0.2.71"))
            own_redis.proc.send_signal(19)  # SIGSTOP
            try:
                started = time.monotonic()
                results = await asyncio.gather(
                    *(srv.call(Call(source="192.0.2.71")) for _ in range(20))
                )
                took = time.monotonic() - started
            finally:
                own_redis.proc.send_signal(18)  # SIGCONT
            return results, took

    results, took = asyncio.run(main())
    assert all(r.variables["SCREEN_RESULT"] == "ERROR" for r in results)
    assert took < 1.5
