"""One Redis connection shared by every screening step, replies handed out in order.

Each screened call is one EVALSHA. Through redis-py's client that is a pool checkout
and release under a condition, a retry wrapper and telemetry hooks around each
command: ~190 us of a session's ~790 us of CPU in bench/. Redis answers the commands of
one connection in the order they arrive, so concurrent steps can share a connection:
each writes its command and waits for its own reply; one reader task hands replies
out in order. Commands written in one loop turn reach Redis together.

The connection is redis-py's (made by the client's pool, so Sentinel discovery, TLS and
AUTH are redis-py's), only the checkout is ours. Used for plain Redis and Sentinel
without WAIT (service.make_service_store decides); Redis Cluster and WAIT keep redis-py's
client. There is no idle health check (its PING would have to await between queueing
and writing): a connection that died while idle costs one call its deadline (that
call gets ERROR), then it is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError


class LinkBroken(RedisConnectionError):
    """The shared connection broke under a waiting command (worth one retry)."""


class _Link:
    """One connected connection, its reader task, and the replies it still owes."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.last_reply = time.monotonic()
        self.broken = False
        self.closed: asyncio.Future | None = None  # the disconnect, once broken
        self.reader = asyncio.create_task(self._read(), name="redis-link-reader")

    async def _read(self) -> None:
        while True:
            try:
                reply: Any = await self.connection.read_response()
            except ResponseError as error:  # an error reply (NOSCRIPT...): that caller's
                reply = error
            except (RedisError, OSError) as error:
                self.fail(error)
                return
            self.last_reply = time.monotonic()
            if not self.waiting:
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future = self.waiting.popleft()
            if future.done():  # its caller gave up (deadline)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def fail(self, error: Exception) -> None:
        """Give up this connection: every caller still waiting gets `error`."""
        if self.broken:
            return
        self.broken = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(LinkBroken(str(error) or type(error).__name__))
        self.reader.cancel()
        # Kept: the loop holds tasks only weakly. close() awaits it.
        self.closed = asyncio.ensure_future(self.connection.disconnect(nowait=True))


class SharedLink:
    """EVALSHA and the like over one shared connection; see the module docstring."""

    def __init__(self, make_connection: Callable[[], AbstractConnection]) -> None:
        self._make_connection = make_connection
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Any) -> Any:
        """Send one command, return its reply. Retried once on a fresh connection if
        the connection broke under it (a Redis restart or failover), as redis-py's
        client does; a Redis that refuses to connect fails at once."""
        try:
            return await self._execute(args)
        except LinkBroken:
            return await self._execute(args)

    async def _execute(self, args: tuple) -> Any:
        link = self._link
        if link is None or link.broken or not link.connection.is_connected:
            link = await self._connect()
        connection = link.connection
        packed = connection.pack_command(*args)
        future = asyncio.get_running_loop().create_future()
        # No await between queueing the future and writing: replies come back in the
        # order the commands were written.
        link.waiting.append(future)
        sent = time.monotonic()
        try:
            await connection.send_packed_command(packed, check_health=False)
        except (RedisError, OSError) as error:
            link.fail(error)
        try:
            return await future
        except asyncio.CancelledError:
            # The caller's deadline. A link that answered nothing since this command
            # went out is stalled (a dead peer, a partition): drop it, so the next
            # call connects afresh instead of queueing behind it.
            if link.last_reply < sent:
                link.fail(TimeoutError("Redis did not answer"))
            raise

    def submit(self, *args: Any) -> asyncio.Future | None:
        """`execute`'s command written now, its reply a future (quick.py), on the live
        connection with nothing waiting to be written; else None and nothing was sent
        (then `execute`). No retry here: a reply of LinkBroken or NOSCRIPT means the
        command did not run, and the caller runs `execute`."""
        link = self._link
        if link is None or link.broken or not link.connection.is_connected:
            return None
        # redis-py's stream writer: what send_packed_command writes to before its drain,
        # which has nothing to wait for on an empty buffer
        writer = getattr(link.connection, "_writer", None)
        if writer is None or writer.transport.is_closing():
            return None
        if writer.transport.get_write_buffer_size():
            return None
        future = asyncio.get_running_loop().create_future()
        link.waiting.append(future)
        writer.writelines(link.connection.pack_command(*args))
        return future

    def gave_up(self, sent: float) -> None:
        """The caller of a command submitted at `sent` (time.monotonic) stopped waiting
        (its deadline): as `_execute` does then, a link that answered nothing since is
        dropped."""
        link = self._link
        if link is not None and link.last_reply < sent:
            link.fail(TimeoutError("Redis did not answer"))

    async def _connect(self) -> _Link:
        async with self._connecting:
            link = self._link
            if link is not None and not link.broken and link.connection.is_connected:
                return link
            if link is not None:
                link.fail(RedisConnectionError("reconnecting"))
            connection = self._make_connection()
            try:
                await connection.connect()
            except (RedisError, OSError) as error:
                with contextlib.suppress(RedisError, OSError):
                    await connection.disconnect(nowait=True)
                raise RedisConnectionError(str(error) or type(error).__name__) from None
            self._link = _Link(connection)
            return self._link

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.fail(RedisConnectionError("closed"))
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await link.reader
            with contextlib.suppress(RedisError, OSError):
                await link.closed
