"""One FastAGI session over asyncio streams, speaking through pyst2.

pyst2's `AGI` formats commands (`send_command`, `_quote`) and parses answers
(`get_result`, with its 510/520/-2 exceptions); this adapter feeds it one command's
bytes at a time, so many sessions share one event loop. Its `__init__` is skipped:
it installs a SIGHUP handler (main thread only) and reads the environment from stdin.

Wire rules from a real Asterisk 20 (shared/asterisk): LF only, one command in flight
(no pipelining), 520 answers span lines, and a `HANGUP` line may arrive in place of
an answer when the caller hangs up; commands keep working on the dead channel.
Knows nothing of Redis or of screening.
"""

from __future__ import annotations

import asyncio
import functools
import io
import re
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from asterisk.agi import AGI, AGIAppError, AGIError, AGIResultHangup, re_code, re_kv

MAX_LINE = 8192  # bytes; Asterisk cuts a dialed number at 79, so real lines are short
MAX_ENV_LINES = 256
MAX_STRAY_LINES = 512
# What passes unchanged through res_agi's parse_args (inside our double quotes) and
# MSet's argument parser (pbx_builtin_setvar_multiple: pairs split on ',' outside
# quotes, parentheses and brackets, each at its first '='; '"' and '\\' removed):
# no comma, '=', quote, backslash, bracket, parenthesis, brace or '$'. Blanks are kept.
_MSET_NAME = re.compile(r"[A-Za-z0-9_]+\Z")
_MSET_VALUE = re.compile(r"[A-Za-z0-9_.:+/' -]*\Z")


class AGIProtocolError(Exception):
    """The peer broke the protocol or went away; the session cannot go on."""


# The lines res_agi writes, in its order (launch_netscript, then setup_env): identical in
# the Asterisk 20.20.1 chan_sip and 22.10.1 PJSIP captures and on Local channels.
# `agi_network_script` is left out when the URL has no path; `agi_arg_1..N` follow.
ASTERISK_KEYS = (
    "agi_network",
    "agi_network_script",
    "agi_request",
    "agi_channel",
    "agi_language",
    "agi_type",
    "agi_uniqueid",
    "agi_version",
    "agi_callerid",
    "agi_calleridname",
    "agi_callingpres",
    "agi_callingani2",
    "agi_callington",
    "agi_callingtns",
    "agi_dnid",
    "agi_rdnis",
    "agi_context",
    "agi_extension",
    "agi_priority",
    "agi_enhanced",
    "agi_accountcode",
    "agi_threadid",
)
_SCRIPT = ASTERISK_KEYS.index("agi_network_script")
_THREADID = ASTERISK_KEYS.index("agi_threadid")
_ASTERISK_KEYS = list(ASTERISK_KEYS)  # compared with a block's keys in one go


@dataclass
class Environment:
    """The `agi_*` block. First occurrence wins: a forged later line cannot replace it.

    Caller text (caller ID, name, dialed number, redirecting number) sits in the middle
    of the block and may carry line feeds, so a forged line can only be told from a real
    one by its place: `tampered` says why the block is not exactly res_agi's layout."""

    values: dict[str, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # every line's key in order; "" if none

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    @property
    def script(self) -> str:
        """`agi_network_script` where res_agi writes it (second line), else ""."""
        if len(self.keys) > _SCRIPT and self.keys[_SCRIPT] == "agi_network_script":
            return self.values["agi_network_script"]
        return ""

    @property
    def route(self) -> str:
        """The script name: `agi_network_script` without any query string."""
        return self.script.partition("?")[0].strip("/")

    @functools.cached_property
    def tampered(self) -> str:
        """Why this is not the block res_agi writes ("" when it is): a line that is not
        the key Asterisk writes at that place, a duplicate, or a block cut short."""
        keys, skipped = self.keys, 0
        if keys[: len(ASTERISK_KEYS)] == _ASTERISK_KEYS and all(
            key == f"agi_arg_{n}" for n, key in enumerate(keys[len(ASTERISK_KEYS) :], 1)
        ):
            return ""  # the usual block, at once
        if len(keys) > _SCRIPT and keys[_SCRIPT] != "agi_network_script":
            keys, skipped = [keys[0], "agi_network_script", *keys[1:]], 1  # URL without a path
        for n, key in enumerate(keys):
            want = ASTERISK_KEYS[n] if n < len(ASTERISK_KEYS) else f"agi_arg_{n - _THREADID}"
            if key != want:
                return f"environment line {n + 1 - skipped} is not {want}"
        if len(keys) < len(ASTERISK_KEYS):
            return f"environment ended before {ASTERISK_KEYS[len(keys)]}"
        return ""

    @property
    def args(self) -> list[str]:
        """The AGI() arguments, only from a block laid out as res_agi writes it."""
        if self.tampered:
            return []
        first = self.keys.index("agi_threadid") + 1
        return [self.values[key] for key in self.keys[first:]]


class Listener(Protocol):
    """What drives a session from SessionStream's callbacks instead of a task."""

    def data_received(self) -> None: ...

    def ended(self) -> None: ...

    @property
    def waiting(self) -> bool:
        """It waits for bytes (not for its store step)."""
        ...


class SessionStream(asyncio.Protocol):
    """One FastAGI connection: its reader and its writer in one small protocol object.

    asyncio's streams cost a StreamReader, a StreamWriter and a StreamReaderProtocol per
    connection, with their weak references and checks: this object takes 52,000 fewer
    instructions a session (of ~860,000; callgrind at 20 calls/s). It keeps the part of
    their interface a session uses,
    `readuntil()` (with StreamReader's IncompleteReadError and LimitOverrunError),
    `write()`, `drain()`, `transport`, `get_extra_info()`, `is_closing()`, `close()`, and
    wakes a waiting read once per line or block, however res_agi's line-by-line writes
    were cut into segments (2-25 per block in the asterisk22 captures; our TCP_QUICKACK
    makes more). `connected(stream)` runs as the session's task."""

    def __init__(
        self,
        connected: Callable[[SessionStream], Coroutine[Any, Any, None]] | None = None,
        limit: int = MAX_LINE,
        opened: Callable[[SessionStream], None] | None = None,
    ) -> None:
        self._connected = connected
        self._opened = opened  # called at connection_made in place of a task, if given
        self._limit = limit
        self._buffer = bytearray()
        # What a waiting read, or the listener, waits for: woken when it came.
        self.separator = b""
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: Exception | None = None  # what ended the connection, if not a close
        self._lost: Exception | None = None  # what a write after the end raises
        self._reading_paused = False
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        # Drives the session from these callbacks while set, with no task (quick.py).
        self.listener: Listener | None = None

    # -- the protocol side (the event loop calls these) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._opened is not None:
            self._opened(self)
        elif self._connected is not None:
            self.start(self._connected(self))

    def start(self, session: Coroutine[Any, Any, None]) -> None:
        """Run `session` as this connection's task (the listener, if any, steps aside)."""
        self.listener = None
        self.task = asyncio.get_running_loop().create_task(session)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        listener = self.listener
        if self._waiter is not None or listener is not None:
            separator = self.separator
            # the separator may straddle two segments: look from just before this one
            start = max(0, len(buffer) - len(data) - len(separator) + 1)
            # woken once per line or block it waits for, not once per segment
            if buffer.find(separator, start) >= 0 or len(buffer) > self._limit:
                if listener is not None:
                    listener.data_received()
                else:
                    self._wake()
        if len(buffer) > 2 * self._limit and not self._reading_paused and self.transport:
            self._reading_paused = True  # a peer that writes without end waits for us
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        if self.listener is not None:
            self.listener.ended()
        return True  # our side may still write (and close) on a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc or ConnectionResetError("Connection lost")
        self._error = exc
        self._wake()
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_exception(self._lost)
        if self.listener is not None:
            self.listener.ended()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the reader side --

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return len(self._buffer)

    @property
    def at_eof(self) -> bool:
        """The peer has closed (or the connection is gone): no more bytes will come."""
        return self._eof

    @property
    def waiting(self) -> bool:
        """A read (or the listener) is waiting for bytes."""
        listener = self.listener
        return self._waiter is not None or (listener is not None and listener.waiting)

    def unread(self, chunk: bytes) -> None:
        """Put back what `take` took: a task reads it next (quick.py hands over)."""
        self._buffer[:0] = chunk

    def take(self, separator: bytes) -> bytes | None:
        """Up to and including `separator` if the buffer holds it within the limit, else
        None (readuntil's first look, without waiting or raising)."""
        buffer = self._buffer
        index = buffer.find(separator)
        end = index + len(separator)
        if index < 0 or end > self._limit:
            return None
        chunk = bytes(buffer[:end])
        del buffer[:end]
        if self._reading_paused and len(buffer) <= self._limit and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Up to and including `separator`, as StreamReader.readuntil: LimitOverrunError
        (the data left in the buffer) past the limit, IncompleteReadError at the end."""
        buffer = self._buffer
        while True:
            chunk = self.take(separator)
            if chunk is not None:
                return chunk
            index = buffer.find(separator)
            if index >= 0:
                raise asyncio.LimitOverrunError("separator found past the limit", index)
            if len(buffer) > self._limit:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(buffer))
            if self._eof:
                if self._error is not None:
                    raise self._error
                chunk = bytes(buffer)
                buffer.clear()
                raise asyncio.IncompleteReadError(chunk, None)
            self.separator = separator
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # -- the writer side --

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is full (StreamWriter.drain)."""
        if self._lost is not None:
            raise self._lost
        if self._writable is not None:
            await self._writable

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        assert self.transport is not None
        return self.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _readline(stream: SessionStream) -> str:
    try:
        raw = await stream.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise AGIProtocolError("connection closed by Asterisk") from None
    except asyncio.LimitOverrunError:
        raise AGIProtocolError(f"line longer than {MAX_LINE} bytes") from None
    return raw[:-1].decode("utf-8", errors="replace")


async def read_environment(stream: SessionStream) -> Environment:
    """Read up to the first empty line, as Asterisk ends the block.

    One `readuntil(b"\\n\\n")` takes the whole block in the usual case (it ends at the
    first empty line, exactly like the line loop); a block longer than the stream limit
    is left in the buffer by readuntil and read line by line instead.
    """
    try:
        block = await stream.readuntil(b"\n\n")
    except asyncio.IncompleteReadError:
        raise AGIProtocolError("connection closed by Asterisk") from None
    except asyncio.LimitOverrunError:
        block = b""
    if block:
        return parse_block(block)
    env = Environment()
    for _ in range(MAX_ENV_LINES):
        line = await _readline(stream)
        if line == "":
            if not env.values:
                raise AGIProtocolError("empty AGI environment")
            return env
        _add_lines(env, [line])
    raise AGIProtocolError(f"AGI environment longer than {MAX_ENV_LINES} lines")


def parse_block(block: bytes) -> Environment:
    """A whole environment block, up to and including its empty line."""
    env = Environment()
    lines = block[:-2].decode("utf-8", errors="replace").split("\n")
    if len(lines) > MAX_ENV_LINES:
        raise AGIProtocolError(f"AGI environment longer than {MAX_ENV_LINES} lines")
    _add_lines(env, lines)
    if not env.values:
        raise AGIProtocolError("empty AGI environment")
    return env


def _add_lines(env: Environment, lines: list[str]) -> None:
    """`key: value` lines, none of them empty (that ends the block): the first of each
    key is kept; a line that is no `agi_` key is recorded as key ""."""
    values, keys = env.values, env.keys
    for line in lines:  # one loop for the whole block: it is 22 lines or more
        key, sep, value = line.partition(": ")
        if not sep or not key.startswith("agi_"):
            if not line:
                raise AGIProtocolError("empty AGI environment")
            key = ""
        elif key not in values:
            values[key] = value
        keys.append(key)


class _Outbox:
    """Where pyst2's `send_command` writes; we take the text and send it ourselves."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


_DISCARD = _Discard()


class AGISession(AGI):
    """pyst2's AGI bound to one asyncio connection, one command at a time."""

    def __init__(self, stream: SessionStream) -> None:
        # Deliberately not AGI.__init__ (signal handler, stdin): see the module docstring.
        self.stream = stream
        self.stdout = _Outbox()
        self.stderr = _DISCARD
        self.stdin = io.StringIO()
        self.env: dict[str, str] = {}
        self._got_sighup = False
        self.hung_up = False  # the caller hung up: Asterisk sent an unsolicited HANGUP
        self.stray: list[str] = []  # lines received before our resync answer
        self.tampered = ""  # why the env block is not res_agi's own layout ("" if it is)

    async def environment(self) -> Environment:
        """Read the env block, noting whether caller text forged lines into it."""
        env = await read_environment(self.stream)
        self.tampered = env.tampered
        return env

    @property
    def injected(self) -> bool:
        """Caller text forged lines: into the env block, or as stray answer lines."""
        return bool(self.stray or self.tampered)

    def injection(self) -> str:
        """What was forged, for a log line (no attacker text)."""
        found = [self.tampered] if self.tampered else []
        if self.stray:
            found.append(f"{len(self.stray)} stray lines before the resync answer")
        return ", ".join(found)

    def command(self, command: str, *args: object) -> bytes:
        """One command line as pyst2 formats it."""
        self.stdout.text = ""
        self.send_command(command, *args)
        return self.stdout.text.encode("utf-8")

    async def send(self, command: str, *args: object) -> None:
        await self.send_bytes(self.command(command, *args))

    async def send_bytes(self, data: bytes) -> None:
        transport = self.stream.transport
        if transport.is_closing():
            raise ConnectionResetError("Connection lost")
        self.stream.write(data)
        if transport.get_write_buffer_size():
            await self.stream.drain()  # only when the socket did not take it all at once

    async def _answer_lines(self) -> str:
        """One whole answer: skip HANGUP notices, follow 520 blocks to their end."""
        for _ in range(8):
            line = await _readline(self.stream)
            if line.strip() == "HANGUP":
                self.hung_up = True
                continue
            if not line.startswith("520-"):
                return line + "\n"
            lines = [line]
            for _ in range(MAX_STRAY_LINES):
                line = await _readline(self.stream)
                lines.append(line)
                if line.startswith("520 "):
                    return "\n".join(lines) + "\n"
            raise AGIProtocolError("520 usage block without an end")
        raise AGIProtocolError("no answer, only HANGUP lines")

    async def run(self, command: str, *args: object) -> dict[str, tuple[str, str]]:
        """Send one command, wait for its whole answer, parse it with pyst2."""
        await self.send(command, *args)
        return await self.answer()

    async def answer(self) -> dict[str, tuple[str, str]]:
        """The whole answer to the command just sent, parsed as pyst2 does.

        `send` then other work then `answer` overlaps that work with Asterisk's."""
        answer = await self._answer_lines()
        try:
            if answer.startswith("200 "):  # the usual case, one line
                return _parse_200(answer)
            match = re_code.search(answer.strip())
            code = int(match.group(1)) if match and match.group(1) else None
            if code == 520 and not answer.startswith("520-"):
                # The code as pyst2 reads it (`0520` is 520): its 520 branch reads on until
                # a line starting `520`, past the end of a lone line: it would loop forever.
                raise AGIProtocolError("520 answer without its usage block")
            self.stdin = io.StringIO(answer)
            return self.get_result()
        except ValueError:
            raise AGIProtocolError("answer is not an AGI result line") from None
        except AGIError as error:  # 510, 511, 520, result=-1, hangup, unknown codes
            raise AGIProtocolError(f"Asterisk refused the command: {error}") from None

    async def set_variable(self, name: str, value: object) -> None:  # type: ignore[override]
        await self.run("SET VARIABLE", self._quote(name), self._quote(str(value)))

    async def set_variables(self, variables: dict[str, object]) -> None:
        """Set these channel variables, in one round trip where Asterisk allows it.

        `EXEC MSet "A=1,B=2"` (core Asterisk: pbx_variables.c) sets them all at once,
        one AGI round trip instead of one per variable, while Asterisk holds the call.
        A value MSet would parse differently (commas, quotes, brackets) and an Asterisk
        that answers -2 (no such application) get one SET VARIABLE each."""
        mset = self.mset(variables)
        if mset is not None:
            await self.send_bytes(mset)
            await self.mset_answered(variables)
            return
        for name, value in variables.items():
            await self.set_variable(name, value)

    def mset(self, variables: dict[str, object]) -> bytes | None:
        """The one `EXEC MSet` command that sets `variables`, or None where MSet cannot."""
        pairs = [(name, str(value)) for name, value in variables.items()]
        if len(pairs) > 1 and all(_MSET_NAME.match(n) and _MSET_VALUE.match(v) for n, v in pairs):
            return self.command("EXEC", "MSet", self._quote(",".join(f"{n}={v}" for n, v in pairs)))
        return None

    async def mset_answered(self, variables: dict[str, object]) -> None:
        """After `mset`'s command: its answer; where Asterisk has no MSet (-2), one SET
        VARIABLE each."""
        if (await self.answer())["result"][0] != "-2":
            return
        for name, value in variables.items():
            await self.set_variable(name, value)

    async def exec_app(self, application: str, options: str) -> str:
        await self.start_exec(application, options)
        return (await self.answer())["result"][0]

    async def start_exec(self, application: str, options: str) -> None:
        """Send `EXEC application "options"`; read its result later with `answer()`."""
        await self.send("EXEC", application, self._quote(options))

    async def resync(self, expression: str = "") -> str:
        """Skip every stray line and return `expression` as Asterisk evaluates it.

        The dialed number reaches the environment raw, so one INVITE can forge env
        lines, end the block early and forge `200 result=...` answers. We ask for a
        random nonce together with the expression; only Asterisk's answer to this
        command can contain the nonce, so every line before it is discarded.
        """
        nonce, command = self.resync_command(expression)
        await self.send_bytes(command)
        return await self.resync_answer(nonce)

    def resync_command(self, expression: str) -> tuple[str, bytes]:
        """A fresh nonce and the command that asks for it together with `expression`."""
        nonce = _nonce()
        return nonce, self.command("GET FULL VARIABLE", self._quote(f"{nonce} {expression}"))

    @staticmethod
    def resync_value(nonce: str, line: str) -> str | None:
        """`expression`'s value if `line` is Asterisk's answer to the resync with
        `nonce`, else None."""
        if not line.startswith(f"200 result=1 ({nonce} "):
            return None
        try:
            data = _parse_200(line)["result"][1]
        except (AGIError, ValueError):
            raise AGIProtocolError("resync answer unreadable") from None
        return data[len(nonce) + 1 :]

    async def resync_answer(self, nonce: str) -> str:
        """After `resync_command`'s command: skip stray lines up to its answer."""
        for _ in range(MAX_STRAY_LINES):
            line = await _readline(self.stream)
            value = self.resync_value(nonce, line)
            if value is not None:
                return value
            if line.strip() == "HANGUP":
                self.hung_up = True
                continue
            self.stray.append(line)
        raise AGIProtocolError(f"no resync answer within {MAX_STRAY_LINES} lines")

    def close(self) -> None:
        """Close our side; a HANGUP Asterisk writes after this is not a caller hangup.

        The transport sends what is still buffered, then closes: nothing to wait for
        (waiting cost a task and a timer per session and told nobody anything)."""
        if not self.stream.is_closing():
            self.stream.close()


class _Nonces:
    """Resync nonces: 12 bytes of os.urandom each, drawn 4 KiB at a time (one syscall
    per 341 sessions instead of one each; as unpredictable, never reused)."""

    def __init__(self, size: int = 4092) -> None:
        self._size = size
        self._pool = b""
        self._at = 0

    def __call__(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = secrets.token_bytes(self._size), 0
        nonce = self._pool[self._at : self._at + 12]
        self._at += 12
        return nonce.hex()


_nonce = _Nonces()


def _parse_200(line: str) -> dict[str, tuple[str, str]]:
    """pyst2's `get_result` for a single-line `200` answer, with its own regexes and
    exceptions, minus its debug output (a `pprint.pformat` of every result, thrown
    away here, was 5% of a session's CPU)."""
    result = {"result": ("", "")}
    response = re_code.search(line.strip()).group(2)  # type: ignore[union-attr]
    for key, value, data in re_kv.findall(response):
        result[key] = (value, data)
        if data == "hangup":
            raise AGIResultHangup("User hungup during execution")
        if key == "result" and value == "-1":
            raise AGIAppError("Error executing application, or hangup")
    return result
