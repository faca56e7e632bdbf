"""The floors of the flood bench: FastAGI servers that do the least a screener can.

    python bench/peers/floor_agi.py --listen 127.0.0.1:4573 [--trips 0|2]

`--trips 0` (the floor): reads the environment block and closes. No screener can cost
Asterisk less than this: res_agi still connects, writes the environment line by line
and sees the close (the shipped dialplan then fails open and logs the seed's NOTICE
itself). What this process spends per call is the least any FastAGI server spends;
bench/asterisk_flood.py compares ours against it.

`--trips 2` (the two-trip floor): also makes a screener's two round trips, with
nothing behind them: asks Asterisk for the caller's address (GET FULL VARIABLE of the
driver's address expression, as our resync does) and answers with one EXEC MSet of
fixed SCREEN_* variables (SCREEN_NOTICE: the address, so the dialplan logs the NOTICE),
then closes. It counts nothing. Between it and the floor lies what the protocol itself
costs Asterisk and the server; between it and our service, what screening adds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

ADDRESS = {  # agi_type -> the expression Asterisk answers with the caller's address
    b"SIP": b"${CHANNEL(recvip)}",
    b"PJSIP": b"${CHANNEL(pjsip,remote_addr)}",
}


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


class TwoTrips(asyncio.Protocol):
    """One session: the block, the address question, one MSet, close."""

    def __init__(self) -> None:
        self.buffer = b""
        self.step = 0  # 0: in the block, 1: waiting for the address, 2: for MSet's answer

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.step == 0 and b"\n\n" in self.buffer:
            block, _, self.buffer = self.buffer.partition(b"\n\n")
            kind = next(
                (line[10:] for line in block.split(b"\n") if line.startswith(b"agi_type: ")), b""
            )
            expression = ADDRESS.get(kind, b"")
            self.transport.write(b'GET FULL VARIABLE "' + expression + b'"\n')
            self.step = 1
        elif self.step == 1 and b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            address = line.partition(b"(")[2].rpartition(b")")[0]
            if address.count(b":") == 1:  # PJSIP's "host:port" (IPv4: the bench's callers)
                address = address.partition(b":")[0]
            self.transport.write(
                b'EXEC MSet "SCREEN_RESULT=COUNTED,SCREEN_COUNTED=yes,SCREEN_NOTICE='
                + address
                + b'"\n'
            )
            self.step = 2
        elif self.step == 2 and b"\n" in self.buffer:
            self.transport.close()


async def serve(host: str, port: int, trips: int) -> None:
    loop = asyncio.get_running_loop()
    protocol = TwoTrips if trips else Floor
    server = await loop.create_server(protocol, host, port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:4573", metavar="HOST:PORT")
    parser.add_argument("--trips", type=int, choices=(0, 2), default=0)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:  # the product's own event loop: the floor must not be slower than we could be
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(host, int(port), args.trips))


if __name__ == "__main__":
    main()
