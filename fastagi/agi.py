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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


class SessionReader(asyncio.StreamReader):
    """asyncio's StreamReader that wakes its session once per line or block it waits
    for, not once per TCP segment.

    res_agi writes every env line with a write(2) of its own and no TCP_NODELAY, so a
    block arrives in 2-25 segments (asterisk22 captures; our TCP_QUICKACK makes it more,
    as each line is acknowledged at once), and StreamReader wakes a waiting
    `readuntil` for each: a task step and a new future per segment, a third of the
    server's CPU per session in bench/session_profile.py. Here a segment that does not
    complete the awaited separator is only buffered. Uses StreamReader's own buffer and
    waiter (CPython 3.11-3.13 internals), in this one place."""

    _awaiting: bytes | None = None  # the separator a readuntil() waits for, if any

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        self._awaiting = separator
        try:
            return await super().readuntil(separator)
        finally:
            self._awaiting = None

    def feed_data(self, data: bytes) -> None:
        separator, buffer = self._awaiting, self._buffer
        if (
            separator is not None
            and self._waiter is not None
            and len(buffer) + len(data) <= self._limit
            and separator not in data
            # the separator may straddle two segments (the block's empty line is a
            # write of its own): only our two-byte b"\n\n" can
            and not (len(separator) == 2 and buffer[-1:] == separator[:1] == data[:1])
        ):
            buffer.extend(data)
            return
        super().feed_data(data)


class SessionProtocol(asyncio.StreamReaderProtocol):
    """StreamReaderProtocol with its reader at hand: each of res_agi's segments goes
    straight to SessionReader.feed_data (asyncio's own looks the reader up through a
    weak reference on every segment)."""

    def __init__(self, reader: SessionReader, connected: Callable[..., Any]) -> None:
        super().__init__(reader, connected)
        self._reader = reader

    def data_received(self, data: bytes) -> None:
        self._reader.feed_data(data)


async def _readline(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise AGIProtocolError("connection closed by Asterisk") from None
    except asyncio.LimitOverrunError:
        raise AGIProtocolError(f"line longer than {MAX_LINE} bytes") from None
    return raw[:-1].decode("utf-8", errors="replace")


async def read_environment(reader: asyncio.StreamReader) -> Environment:
    """Read up to the first empty line, as Asterisk ends the block.

    One `readuntil(b"\\n\\n")` takes the whole block in the usual case (it ends at the
    first empty line, exactly like the line loop); a block longer than the stream limit
    is left in the buffer by readuntil and read line by line instead.
    """
    env = Environment()
    try:
        block = await reader.readuntil(b"\n\n")
    except asyncio.IncompleteReadError:
        raise AGIProtocolError("connection closed by Asterisk") from None
    except asyncio.LimitOverrunError:
        block = b""
    if block:
        lines = block[:-2].decode("utf-8", errors="replace").split("\n")
        if len(lines) > MAX_ENV_LINES:
            raise AGIProtocolError(f"AGI environment longer than {MAX_ENV_LINES} lines")
        for line in lines:
            if not _add_env_line(env, line):
                raise AGIProtocolError("empty AGI environment")
        if not env.values:
            raise AGIProtocolError("empty AGI environment")
        return env
    for _ in range(MAX_ENV_LINES):
        line = await _readline(reader)
        if line == "":
            if not env.values:
                raise AGIProtocolError("empty AGI environment")
            return env
        _add_env_line(env, line)
    raise AGIProtocolError(f"AGI environment longer than {MAX_ENV_LINES} lines")


def _add_env_line(env: Environment, line: str) -> bool:
    """One `key: value` line; False for an empty line (the end of the block)."""
    if not line:
        return False
    key, sep, value = line.partition(": ")
    if not sep or not key.startswith("agi_"):
        key = ""
    elif key not in env.values:
        env.values[key] = value
    env.keys.append(key)
    return True


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

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Deliberately not AGI.__init__ (signal handler, stdin): see the module docstring.
        self.reader = reader
        self.writer = writer
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
        env = await read_environment(self.reader)
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

    async def send(self, command: str, *args: object) -> None:
        self.stdout.text = ""
        self.send_command(command, *args)
        transport = self.writer.transport
        if transport.is_closing():
            raise ConnectionResetError("Connection lost")
        self.writer.write(self.stdout.text.encode("utf-8"))
        if transport.get_write_buffer_size():
            await self.writer.drain()  # only when the socket did not take it all at once

    async def _answer_lines(self) -> str:
        """One whole answer: skip HANGUP notices, follow 520 blocks to their end."""
        for _ in range(8):
            line = await _readline(self.reader)
            if line.strip() == "HANGUP":
                self.hung_up = True
                continue
            if not line.startswith("520-"):
                return line + "\n"
            lines = [line]
            for _ in range(MAX_STRAY_LINES):
                line = await _readline(self.reader)
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
        pairs = [(name, str(value)) for name, value in variables.items()]
        if len(pairs) > 1 and all(_MSET_NAME.match(n) and _MSET_VALUE.match(v) for n, v in pairs):
            options = ",".join(f"{name}={value}" for name, value in pairs)
            if await self.exec_app("MSet", options) != "-2":
                return
        for name, value in pairs:
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
        nonce = secrets.token_hex(12)
        await self.send("GET FULL VARIABLE", self._quote(f"{nonce} {expression}"))
        marker = f"200 result=1 ({nonce} "
        for _ in range(MAX_STRAY_LINES):
            line = await _readline(self.reader)
            if line.startswith(marker):
                try:
                    data = _parse_200(line)["result"][1]
                except (AGIError, ValueError):
                    raise AGIProtocolError("resync answer unreadable") from None
                return data[len(nonce) + 1 :]
            if line.strip() == "HANGUP":
                self.hung_up = True
                continue
            self.stray.append(line)
        raise AGIProtocolError(f"no resync answer within {MAX_STRAY_LINES} lines")

    async def close(self) -> None:
        """Close our side; a HANGUP Asterisk writes after this is not a caller hangup.

        The transport sends what is still buffered, then closes: nothing to wait for
        (waiting cost a task and a timer per session and told nobody anything)."""
        if not self.writer.is_closing():
            self.writer.close()


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
