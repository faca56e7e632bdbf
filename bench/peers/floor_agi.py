"""The floor of the flood bench: a FastAGI server that reads the environment block and closes.

    python bench/peers/floor_agi.py --listen 127.0.0.1:4573

No screener can cost Asterisk less than this: res_agi still connects, writes the
environment line by line and sees the close (the shipped dialplan then fails open and
logs the seed's NOTICE itself). What this process spends per call is the least any
FastAGI server spends; bench/asterisk_flood.py compares ours against it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib


class Floor(asyncio.Protocol):
    """One session: bytes until the blank line that ends the block, then close."""

    def __init__(self) -> None:
        self.tail = b""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # the blank line may straddle two reads: keep the last byte of the previous one
        if b"\n\n" in self.tail + data:
            self.transport.close()
        self.tail = data[-1:]


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, host, port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:4573", metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:  # the product's own event loop: the floor must not be slower than we could be
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(host, int(port)))


if __name__ == "__main__":
    main()
