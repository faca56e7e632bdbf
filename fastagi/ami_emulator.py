"""A fake Asterisk manager interface (AMI), built from real Asterisk 22 captures.

For tests and demos of the password-guessing watcher (auth.py): a TCP server that says
Asterisk's banner, handles Login (a `read=security` user: every other action is
refused as Asterisk refuses it), then writes captured event bytes unchanged, CR, LF
and all. It can also stall (accept, say nothing), drop every connection, or send
garbage. `python -m fastagi.ami_emulator` runs one, for a test in a network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import Iterable
from pathlib import Path

from fastagi.ami import BANNER_PREFIX, TERMINATOR, parse_message

BANNER = b"Asterisk Call Manager/11.0.0\r\n"  # what Asterisk 22.10.1 says
# A wrong password over PJSIP as Asterisk 22.10.1 wrote it (ami-raw.bin, step 1),
# the template of `failure()`.
CHALLENGE_FAILED = (
    b"Event: ChallengeResponseFailed\r\nPrivilege: security,all\r\n"
    b"EventTV: 2026-12-02T11:41:05.021+0000\r\nSeverity: Error\r\nService: PJSIP\r\n"
    b"EventVersion: 1\r\nAccountID: 100\r\nSessionID: {session}\r\n"
    b"LocalAddress: IPV4/UDP/127.0.0.1/5080\r\nRemoteAddress: {remote}\r\n"
    b"Challenge: 1796211665/649de47a498c77d56a187c2b87c4139f\r\n"
    b"Response: c6a68e67f5f070343a05042f1645e5ee\r\nExpectedResponse: \r\n\r\n"
)
SUCCESSFUL_AUTH = (
    b"Event: SuccessfulAuth\r\nPrivilege: security,all\r\n"
    b"EventTV: 2026-12-02T11:41:03.520+0000\r\nSeverity: Informational\r\nService: AMI\r\n"
    b"EventVersion: 1\r\nAccountID: {user}\r\nSessionID: 0x7febfc001460\r\n"
    b"LocalAddress: IPV4/TCP/127.0.0.1/5038\r\nRemoteAddress: IPV4/TCP/{peer}/{port}\r\n"
    b"UsingPassword: 0\r\nSessionTV: 2026-12-02T11:41:03.520+0000\r\n\r\n"
)
_sessions = itertools.count(1)


def captured_events(data: bytes) -> list[bytes]:
    """The event messages of a raw AMI capture, each with its CRLF CRLF, as Asterisk
    wrote them; banners and the recorder's own login responses left out."""
    events = []
    for frame in data.split(TERMINATOR)[:-1]:
        if frame.startswith(BANNER_PREFIX):
            frame = frame.partition(b"\r\n")[2]
        if frame.startswith(b"Event: "):
            events.append(frame + TERMINATOR)
    return events


def failure(address: str, port: int = 5060) -> bytes:
    """A captured ChallengeResponseFailed, from `address`, in a session of its own."""
    family = "IPV6" if ":" in address else "IPV4"
    remote = f"{family}/UDP/{address}/{port}".encode()
    session = b"emulated-%d@lab" % next(_sessions)
    return CHALLENGE_FAILED.replace(b"{session}", session).replace(b"{remote}", remote)


class FakeAMI:
    """An AMI on 127.0.0.1: one `username`/`secret` with read=security.

    `on_login`: bytes written right after the first successful login (a replayed
    capture; like Asterisk, a reconnect does not get old events again).
    `permissive`: every action succeeds (a manager.conf user with too many rights).
    `stall`: accept connections but never say anything. `garbage`: after the banner,
    these bytes instead of a login answer."""

    def __init__(
        self,
        username: str = "fastagi",
        secret: str = "s3cret",
        on_login: bytes = b"",
        permissive: bool = False,
        stall: bool = False,
        garbage: bytes = b"",
    ) -> None:
        self.username = username
        self.secret = secret
        self.on_login = on_login
        self.permissive = permissive
        self.stall = stall
        self.garbage = garbage
        self.logins = 0
        self.refused_logins = 0
        self.actions: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._logged_in: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._connection, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def send(self, data: bytes) -> None:
        """Write raw bytes to every logged-in session (events, or anything else)."""
        for writer in list(self._logged_in):
            writer.write(data)
            with contextlib.suppress(OSError):
                await writer.drain()

    def drop(self) -> None:
        """Every connection reset, as a restarting Asterisk does."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._writers.add(writer)
        try:
            if self.stall:
                await reader.read()  # until the client gives up
                return
            writer.write(BANNER)
            if self.garbage:
                writer.write(self.garbage)
                await writer.drain()
                await reader.read()
                return
            while True:
                frame = await reader.readuntil(TERMINATOR)
                if not await self._action(parse_message(frame[:-4]).fields, writer):
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            self._logged_in.discard(writer)
            writer.transport.abort()

    async def _action(self, fields: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        """Answer one action as Asterisk does; False closes the session."""
        name = fields.get("Action", "").lower()
        self.actions.append(name)
        action_id = fields.get("ActionID", "")
        head = f"ActionID: {action_id}\r\n" if action_id else ""
        if name == "login":
            if (fields.get("Username"), fields.get("Secret")) != (self.username, self.secret):
                self.refused_logins += 1
                writer.write(
                    f"Response: Error\r\n{head}Message: Authentication failed\r\n\r\n".encode()
                )
                await writer.drain()
                return False  # Asterisk closes the session after a failed login
            self.logins += 1
            self._logged_in.add(writer)
            peer, port = writer.get_extra_info("peername")[:2]
            writer.write(
                f"Response: Success\r\n{head}Message: Authentication accepted\r\n\r\n".encode()
            )
            writer.write(
                SUCCESSFUL_AUTH.replace(b"{user}", self.username.encode())
                .replace(b"{peer}", str(peer).encode())
                .replace(b"{port}", str(port).encode())
            )
            writer.write(self.on_login)
            self.on_login = b""
        elif writer not in self._logged_in:
            writer.write(
                f"Response: Error\r\n{head}Message: Authentication Required\r\n\r\n".encode()
            )
        elif name == "ping":
            writer.write(f"Response: Success\r\n{head}Ping: Pong\r\n\r\n".encode())
        elif name == "logoff":
            writer.write(
                f"Response: Goodbye\r\n{head}Message: Thanks for all the fish.\r\n\r\n".encode()
            )
            await writer.drain()
            return False
        elif self.permissive:
            writer.write(f"Response: Success\r\n{head}Message: Done\r\n\r\n".encode())
        else:
            writer.write(f"Response: Error\r\n{head}Message: Permission denied\r\n\r\n".encode())
        await writer.drain()
        return True


def events_from(paths: Iterable[str]) -> bytes:
    return b"".join(b"".join(captured_events(Path(p).read_bytes())) for p in paths)


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    payload = events_from(args.capture)
    payload += b"".join(failure(address) for address in args.failure_from)
    ami = FakeAMI(args.username, args.secret, on_login=payload)
    await ami.start(host.strip("[]"), int(port))
    print(f"fake AMI on {args.listen}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:5038")
    parser.add_argument("--username", default="fastagi")
    parser.add_argument("--secret", default="s3cret")
    parser.add_argument("--capture", action="append", default=[], help="raw AMI capture")
    parser.add_argument(
        "--failure-from",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="after each login: one ChallengeResponseFailed from ADDRESS (repeatable)",
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
