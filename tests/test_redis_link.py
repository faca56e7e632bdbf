"""The screening steps' shared Redis connection (fastagi/redis_link.py), on a real
redis-server: every caller gets its own reply, whatever the others do."""

from __future__ import annotations

import asyncio
import os
import signal

import redis.asyncio as aioredis

from fastagi.redis_link import SharedLink

# Keeps Redis busy for ARGV[1] ms (DEBUG SLEEP is disabled on Redis 7 by default).
BUSY = """
local function ms() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local start = ms()
while ms() - start < tonumber(ARGV[1]) do end
return 1
"""


LINK_NAME = f"shared-link-{os.getpid()}-{id(object())}"


def _link(url: str) -> tuple[aioredis.Redis, SharedLink]:
    """A client to ask Redis with, and the link under test, whose connections carry a
    name of their own: the session's Redis may still hold other tests' connections."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5)
    named = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, client_name=LINK_NAME)
    return client, SharedLink(named.connection_pool.make_connection)


async def _link_clients(client: aioredis.Redis) -> int:
    """Connections Redis sees from the link under test."""
    return sum(1 for entry in await client.client_list() if entry.get("name") == LINK_NAME)


def test_concurrent_callers_each_get_their_own_reply_over_one_connection(redis_url):
    async def main() -> tuple[list[bytes], int]:
        client, link = _link(redis_url)
        try:
            # Sizes vary so replies arrive split across reads in every way.
            words = [os.urandom(1 + (i * 37) % 3000).hex() for i in range(500)]
            replies = await asyncio.gather(*(link.execute("ECHO", w) for w in words))
            connections = await _link_clients(client)
            return [r.decode() for r in replies] == words, connections
        finally:
            await link.close()
            await client.aclose()

    all_matched, connections = asyncio.run(main())
    assert all_matched
    assert connections == 1


def test_a_caller_that_gives_up_shifts_no_reply_to_another(redis_url):
    """A caller cancelled by its deadline while Redis is busy: the callers behind it
    still get their own replies (on the same link or, if it was dropped, a new one)."""

    async def main() -> list[tuple[str, str]]:
        client, link = _link(redis_url)
        try:
            slow = asyncio.ensure_future(link.execute("EVAL", BUSY, 0, 300))
            await asyncio.sleep(0.05)
            behind = [asyncio.ensure_future(link.execute("ECHO", f"w{i}")) for i in range(20)]
            await asyncio.sleep(0.05)
            slow.cancel()
            replies = await asyncio.gather(*behind)
            after = [await link.execute("ECHO", f"a{i}") for i in range(5)]
            return [(f"w{i}", r.decode()) for i, r in enumerate(replies)] + [
                (f"a{i}", r.decode()) for i, r in enumerate(after)
            ]
        finally:
            await link.close()
            await client.aclose()

    for expected, got in asyncio.run(main()):
        assert got == expected


def test_a_caller_that_gives_up_on_a_live_link_shifts_no_reply(redis_url):
    """A deadline expiring while the link is alive (it answered since that command
    went out): the link is kept, and the callers behind still get their own replies."""

    async def main() -> tuple[list, int]:
        client, link = _link(redis_url)
        try:
            await link.execute("PING")  # connected: the commands below go out in one turn
            first = asyncio.ensure_future(link.execute("ECHO", "first"))
            # BLPOP holds this connection's later commands until something is pushed;
            # Redis still sends the reply to "first" at once.
            busy = asyncio.ensure_future(link.execute("BLPOP", "test:link", 0))
            behind = [asyncio.ensure_future(link.execute("ECHO", f"w{i}")) for i in range(8)]
            await first  # the link answered after every command above went out
            await asyncio.sleep(0.05)
            behind[3].cancel()
            await asyncio.sleep(0.05)
            await client.rpush("test:link", "go")
            results = await asyncio.gather(busy, *behind, return_exceptions=True)
            return results, await _link_clients(client)
        finally:
            await link.close()
            await client.aclose()

    results, connections = asyncio.run(main())
    assert results[0] == [b"test:link", b"go"]
    for i, result in enumerate(results[1:]):
        if i == 3:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == f"w{i}".encode()
    assert connections == 1  # kept: no reconnect


def test_a_stalled_redis_fails_callers_within_their_deadline_and_the_link_recovers(own_redis):
    async def main() -> tuple[int, float, bytes]:
        client, link = _link(own_redis.url)
        try:
            assert await link.execute("PING") == b"PONG"
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            started = loop.time()
            failed = 0
            try:
                for _ in range(3):
                    try:
                        async with asyncio.timeout(0.2):
                            await link.execute("PING")
                    except TimeoutError:
                        failed += 1
            finally:
                os.kill(own_redis.proc.pid, signal.SIGCONT)
            waited = loop.time() - started
            return failed, waited, await link.execute("ECHO", "back")
        finally:
            await link.close()
            await client.aclose()

    failed, waited, back = asyncio.run(main())
    assert failed == 3
    assert waited < 1.5
    assert back == b"back"


def test_a_restarted_redis_is_reached_again_without_an_error(own_redis):
    async def main() -> tuple[bytes, bytes]:
        client, link = _link(own_redis.url)
        try:
            first = await link.execute("ECHO", "before")
            own_redis.stop()
            own_redis.start()
            return first, await link.execute("ECHO", "after")
        finally:
            await link.close()
            await client.aclose()

    assert asyncio.run(main()) == (b"before", b"after")


def test_an_error_reply_goes_to_its_caller_only(redis_url):
    async def main() -> tuple[str, list[bytes]]:
        client, link = _link(redis_url)
        try:
            results = await asyncio.gather(
                link.execute("ECHO", "x"),
                link.execute("EVALSHA", "0" * 40, 0),
                link.execute("ECHO", "y"),
                return_exceptions=True,
            )
            return type(results[1]).__name__, [results[0], results[2]]
        finally:
            await link.close()
            await client.aclose()

    error, others = asyncio.run(main())
    assert error == "NoScriptError"
    assert others == [b"x", b"y"]
