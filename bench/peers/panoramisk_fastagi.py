"""Peer for the bench: panoramisk's `fast_agi.Application` (asyncio), redis.asyncio.

    python bench/peers/panoramisk_fastagi.py --listen 127.0.0.1:4575 --redis redis://127.0.0.1:6379/0

The same work per session as fastagi-screen's `screen` route: read the environment,
ask Asterisk for the caller's address (GET VARIABLE CHANNEL(recvip)), INCR+EXPIRE in
Redis (one pipelined round trip), one EXEC MSet of SCREEN_RESULT, SCREEN_COUNT,
SCREEN_COUNTED and SCREEN_NOTICE (the shipped dialplan logs the NOTICE line from it).

Beware: panoramisk 1.4's header loop (`while b'\\n\\n' not in buffer: buffer +=
await reader.read(100)`) spins forever at 100% CPU when a client closes before the
blank line, so never probe this port with a bare connect; wait for it with ss/proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import redis.asyncio as aioredis
from panoramisk.fast_agi import Application

THRESHOLD = 5
WINDOW = 600


def make_app(client: aioredis.Redis) -> Application:
    app = Application()

    async def screen(request) -> None:
        answer = await request.send_command('GET VARIABLE "CHANNEL(recvip)"')
        ip = answer["result"][1]
        key = f"peer:count:{ip}"
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, WINDOW)
            count, _ = await pipe.execute()
        result = "BANNED" if count >= THRESHOLD else "COUNTED"
        # one round trip, the dialplan logs the NOTICE from SCREEN_NOTICE: as ours does
        await request.send_command(
            f'EXEC MSet "SCREEN_RESULT={result},SCREEN_COUNT={count},'
            f'SCREEN_COUNTED=yes,SCREEN_NOTICE={ip}"'
        )

    app.add_route("screen", screen)
    return app


async def serve(listen: str, redis_url: str) -> None:
    host, _, port = listen.rpartition(":")
    # Like fastagi-screen's store: a bounded pool that waits for a free connection
    # (redis-py's default pool fails past 100 connections: MaxConnectionsError).
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, max_connections=64, timeout=5, socket_timeout=1
    )
    client = aioredis.Redis(connection_pool=pool)
    app = make_app(client)
    server = await asyncio.start_server(app.handler, host, int(port), backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:4575")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.redis))
    return 0


if __name__ == "__main__":
    sys.exit(main())
