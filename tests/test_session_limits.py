"""Half-open and idle connections end by session_timeout; others keep being served."""

from __future__ import annotations

import asyncio
import time

from fastagi.emulator import Call, environment_block
from tests.harness import running_server


def test_half_env_block_then_silence_is_closed_by_session_timeout():
    async def main():
        async with running_server(SERVER_SESSION_TIMEOUT="1s") as srv:
            host, port = "127.0.0.1", int(srv.target.split(":")[2].split("/")[0])
            first, _ = environment_block(Call(), srv.target, 1)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(first[: len(first) // 2])
            started = time.monotonic()
            served = await srv.call(Call(source="192.0.2.80"))
            data = await asyncio.wait_for(reader.read(), 3)
            closed_after = time.monotonic() - started
            writer.close()
            return served, data, closed_after, srv.server.stats

    served, data, closed_after, stats = asyncio.run(main())
    assert served.variables["SCREEN_RESULT"] == "COUNTED"
    assert data == b""  # nothing executed on a session that never finished its env
    assert 0.8 < closed_after < 1.6
    assert stats.timeouts == 1


def test_500_idle_connections_all_closed_by_session_timeout_while_calls_are_served():
    async def main():
        async with running_server(SERVER_SESSION_TIMEOUT="2s", SERVER_MAX_SESSIONS="600") as srv:
            port = int(srv.target.split(":")[2].split("/")[0])
            idle = []
            for _ in range(500):
                idle.append(await asyncio.open_connection("127.0.0.1", port))
            started = time.monotonic()
            served = [await srv.call(Call(source="192.0.2.81")) for _ in range(20)]
            serve_time = time.monotonic() - started
            closed = await asyncio.gather(
                *(asyncio.wait_for(reader.read(), 4) for reader, _ in idle)
            )
            all_closed_after = time.monotonic() - started
            for _, writer in idle:
                writer.close()
            return served, serve_time, closed, all_closed_after, srv.server.stats

    served, serve_time, closed, all_closed_after, stats = asyncio.run(main())
    assert [r.variables["SCREEN_RESULT"] for r in served] == ["COUNTED"] * 4 + ["BANNED"] * 16
    assert serve_time < 1.5  # served while 500 connections sat idle
    assert closed == [b""] * 500
    assert all_closed_after < 2.6
    assert stats.timeouts == 500 and stats.active == 0
