"""A fake Asterisk (20.20.1 chan_sip or PJSIP, 22.10.1 PJSIP): opens FastAGI sessions
exactly as res_agi does. `FakeAsterisk(asterisk=...)` says which one it plays (ASTERISKS).

Used by `fastagi-ctl simulate`, the tests and the bench, and importable by users'
own tests. It writes the environment block byte for byte as captured from a real
Asterisk 20.20.1 (shared/asterisk/agi-env-chan_sip.txt; PJSIP calls as Asterisk
22.10.1 wrote them, asterisk22/agi-env-pjsip.raw.txt), and writes it as res_agi
does: one write(2) per `agi_xxx: value` line, then one for the empty line, on a
socket without TCP_NODELAY, and one write per answer (a 520 block: three), so a
server meets the same segments and Nagle waits as on a real PBX. It decodes the dialed number
the way chan_sip does (so `%0A` becomes a raw LF in `agi_dnid`), splits AGI()
arguments as Asterisk's app parser does, and answers commands like res_agi: GET
(FULL) VARIABLE with channel functions, SET VARIABLE, EXEC Log and MSet, 510/511/520,
and the HANGUP line after the server's close or a caller hangup. It notes protocol
misuse a real Asterisk punishes (pipelined commands, CRLF).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import itertools
import os
import re
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_EXTEN = 79  # AST_MAX_EXTENSION - 1: chan_sip cuts the decoded user part here
MAX_AGI_CONNECT = 2.0  # res_agi gives up connecting after this (AGISTATUS=FAILURE)
_channel_ids = itertools.count(0x32)
# The Asterisks of the captures: name -> (agi_version, its SIP channel driver's agi_type).
# chan_sip is gone from 21 on; 22's PJSIP cuts agi_dnid at MAX_EXTEN as well as EXTEN.
ASTERISKS = {
    "20.20.1-chan_sip": ("20.20.1", "SIP"),
    "20.20.1-pjsip": ("20.20.1", "PJSIP"),
    "22.10.1-pjsip": ("22.10.1", "PJSIP"),
}
DEFAULT_VERSION = {"SIP": "20.20.1", "PJSIP": "22.10.1"}  # when no Asterisk is named


@dataclass
class Call:
    """One guest call as Asterisk sees it when the dialplan reaches AGI()."""

    source: str = "127.0.0.6"  # the packet's source address (what CHANNEL(recvip) says)
    source_port: int = 5060
    exten: str = "7001"  # the dialed user part, already URL-decoded (use `Call.from_uri`)
    channel_type: str = "SIP"  # SIP | PJSIP | Local
    agi_args: str = ""  # the AGI() arguments after the URL, before expansion
    callerid: str = "anonymous-scanner"  # the From user, URL-decoded by chan_sip
    calleridname: str = "lab caller"
    callingpres: int = 0  # 67 on a bare originated Local channel
    rdnis: str = "unknown"  # the redirecting number (Diversion header)
    context: str = "from-sip-external"
    priority: int = 6
    uniqueid: str = ""
    threadid: str = "140459785762496"
    hangup_after: float | None = None  # the caller hangs up this many seconds in
    dnid: str | None = None  # the dialed number uncut (chan_sip cuts only ${EXTEN} at 79)
    version: str = ""  # agi_version; "" = DEFAULT_VERSION of the channel type

    @classmethod
    def from_uri_user(cls, user: str, **kwargs: object) -> Call:
        """A call whose Request-URI user part is `user`, percent-decoded and cut as the
        driver does: chan_sip cuts ${EXTEN} at 79, PJSIP agi_dnid too."""
        dialed = unquote(user)
        dnid = dialed[:MAX_EXTEN] if kwargs.get("channel_type") == "PJSIP" else dialed
        return cls(exten=dialed[:MAX_EXTEN], dnid=dnid, **kwargs)  # type: ignore[arg-type]

    def channel_name(self, serial: int) -> str:
        if self.channel_type == "Local":
            return f"Local/{self.exten}@agi-local-{serial:08x};2"
        if self.channel_type == "PJSIP":  # named after the endpoint, not the address
            return f"PJSIP/anonymous-{serial:08x}"
        return f"{self.channel_type}/{self.source}-{serial:08x}"

    def remote_addr(self) -> str:
        host = self.source
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
        return f"{host}:{self.source_port}"

    def functions(self) -> dict[str, str]:
        """What `${...}` channel functions evaluate to on this channel."""
        sip = self.channel_type == "SIP"
        pjsip = self.channel_type == "PJSIP"
        return {
            "CHANNEL(recvip)": self.source if sip else "",
            "CHANNEL(peerip)": self.source if sip else "",
            "CHANNEL(recvport)": str(self.source_port) if sip else "",
            "CHANNEL(pjsip,remote_addr)": self.remote_addr() if pjsip else "",
            "SIPCHANINFO(recvip)": "",  # removed in Asterisk 13
            "CHANNEL(channeltype)": self.channel_type,
            "EXTEN": self.exten,
        }


def separate_args(text: str) -> list[str]:
    """Split AGI()'s argument string like Asterisk's app parser: commas separate,
    double quotes, parentheses and square brackets group (quotes are removed),
    backslash escapes."""
    args, current, quoted, depth, escaped = [], [], False, 0, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif quoted:
            current.append(char)
        elif char in "([":
            depth += 1
            current.append(char)
        elif char in ")]" and depth:
            depth -= 1
            current.append(char)
        elif char == "," and depth == 0:
            args.append("".join(current))
            current = []
        else:
            current.append(char)
    args.append("".join(current))
    return args


def expand(text: str, variables: dict[str, str]) -> str:
    """Substitute `${NAME}` the way pbx_substitute_variables does for our functions."""
    return re.sub(r"\$\{([^{}]*)\}", lambda m: variables.get(m.group(1), ""), text)


def environment_lines(call: Call, url: str, serial: int) -> list[bytes]:
    """The env block as res_agi writes it: one `ast_agi_send` per line (launch_netscript
    writes `agi_network` and `agi_network_script`, setup_env the rest), the empty line last."""
    script = url.split("/", 3)[3] if url.count("/") >= 3 else ""
    lines = [("agi_network", "yes")]
    if script:
        lines.append(("agi_network_script", script))
    uniqueid = call.uniqueid or f"{int(time.time())}.{serial}"
    lines += [
        ("agi_request", url),
        ("agi_channel", call.channel_name(serial)),
        ("agi_language", "en"),
        ("agi_type", call.channel_type),
        ("agi_uniqueid", uniqueid),
        ("agi_version", call.version or DEFAULT_VERSION.get(call.channel_type, "20.20.1")),
        ("agi_callerid", call.callerid),
        ("agi_calleridname", call.calleridname),
        ("agi_callingpres", str(call.callingpres)),
        ("agi_callingani2", "0"),
        ("agi_callington", "0"),
        ("agi_callingtns", "0"),
        ("agi_dnid", call.exten if call.dnid is None else call.dnid),
        ("agi_rdnis", call.rdnis),
        ("agi_context", call.context),
        ("agi_extension", call.exten),
        ("agi_priority", str(call.priority)),
        ("agi_enhanced", "0.0"),
        ("agi_accountcode", ""),
        ("agi_threadid", call.threadid),
    ]
    if call.agi_args:
        expanded = expand(call.agi_args, call.functions())
        for n, arg in enumerate(separate_args(expanded), start=1):
            lines.append((f"agi_arg_{n}", arg))
    return [f"{k}: {v}\n".encode() for k, v in lines] + [b"\n"]


def environment_block(call: Call, url: str, serial: int) -> tuple[bytes, bytes]:
    """The env block in the two TCP segments of the chan_sip capture (Nagle cut it after
    `agi_context`; `environment_lines` is how it is written)."""
    lines = environment_lines(call, url, serial)
    cut = next(n for n, line in enumerate(lines) if line.startswith(b"agi_context: ")) + 1
    return b"".join(lines[:cut]), b"".join(lines[cut:])


class LineWriter:
    """Writes to a connection as res_agi does (ast_agi_send -> ast_carefulwrite): one
    write(2) per call, Nagle left on (Asterisk never sets TCP_NODELAY; asyncio and
    uvloop set it on every TCP transport, and uvloop merges the writes of one loop turn
    into one writev). Straight to the socket while the transport holds nothing back;
    once the kernel's buffer was full, through the transport, so the order stays."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fd = -1
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
                self.fd = sock.fileno()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if self.fd >= 0 and not transport.get_write_buffer_size():  # type: ignore[attr-defined]
            try:
                data = data[os.write(self.fd, data) :]
            except BlockingIOError:
                pass
            except OSError:
                return  # reset or closed by the server: the read side sees it
            if not data:
                return
        transport.write(data)  # type: ignore[attr-defined]

    def write_answer(self, answer: str) -> None:
        """One AGI answer: one write, a 520 block three (its head, the usage text, its end)."""
        if answer.startswith("520-"):
            head, rest = answer.split("\n", 1)
            usage, end = rest[:-1].rsplit("\n", 1)
            for part in (head, usage, end):
                self.write(f"{part}\n".encode())
        else:
            self.write(answer.encode())


def split_words(line: str) -> list[str]:
    """res_agi's parse_args: words split on spaces, double quotes group and vanish."""
    words, current, quoted, started = [], [], False, False
    for char in line:
        if char == '"':
            quoted = not quoted
            started = True
        elif char == " " and not quoted:
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        words.append("".join(current))
    return words


DEAD_FORBIDDEN = {"ANSWER", "CHANNEL STATUS", "STREAM FILE", "HANGUP"}
USAGE = {
    "GET VARIABLE": [
        "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set.",
        "Example return code: 200 result=1 (testvariable)",
    ],
    "SET VARIABLE": ["Sets a variable to the current channel."],
    "GET FULL VARIABLE": ["Evaluates <replaceable>expression</replaceable>."],
    "EXEC": [
        "Executes <replaceable>application</replaceable> with given <replaceable>"
        "options</replaceable>."
    ],
}


@dataclass
class CallResult:
    """What the dialplan would see after AGI() returns, and what the log would hold."""

    variables: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    agistatus: str = "SUCCESS"
    seconds: float = 0.0
    pipelined: int = 0  # commands that arrived behind another one (Asterisk would stall)
    crlf: int = 0
    callid: str = "C-00000000"


class FakeAsterisk:
    """Plays Asterisk's side of FastAGI sessions against a server.

    `asterisk` names the Asterisk it plays (a key of ASTERISKS): its agi_version, and
    its SIP driver for calls that name none; "" plays the version of each call's driver
    (20.20.1 for chan_sip, 22.10.1 for PJSIP)."""

    def __init__(
        self,
        hold_limit: float = 30.0,
        asterisk: str = "",
        notice_step: bool = True,
        connect_timeout: float = MAX_AGI_CONNECT,
    ) -> None:
        self.hold_limit = hold_limit  # a real Asterisk waits forever; the emulator does not
        self.connect_timeout = connect_timeout
        # After AGI(): the shipped dialplan's [fastagi-notice] (False: a dialplan without it).
        self.notice_step = notice_step
        if asterisk and asterisk not in ASTERISKS:
            raise ValueError(f"unknown Asterisk {asterisk!r} (one of {', '.join(ASTERISKS)})")
        self.asterisk = asterisk

    def prepare(self, call: Call | None = None) -> Call:
        """`call` as this Asterisk would place it (its version, its SIP driver)."""
        if not self.asterisk:
            return call or Call()
        version, driver = ASTERISKS[self.asterisk]
        call = call or Call(channel_type=driver)
        if call.channel_type in ("SIP", "PJSIP") and call.channel_type != driver:
            raise ValueError(f"Asterisk {self.asterisk} has no {call.channel_type} channels")
        return dataclasses.replace(call, version=call.version or version)

    async def call(self, target: str, call: Call | None = None) -> CallResult:
        call = self.prepare(call)
        parts = urlsplit(target)
        host, port = parts.hostname or "127.0.0.1", parts.port or 4573
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):  # refused or timed out: AGISTATUS=FAILURE, dialplan goes on
            result = CallResult(agistatus="FAILURE", callid=f"C-{next(_channel_ids):08x}")
        else:
            try:
                result = await self._dialogue(reader, writer, target, call)
            finally:
                writer.close()
        if self.notice_step and (line := notice_step(call, result.variables)):
            # The shipped dialplan sends a dialed number or caller ID outside [0-9a-zA-Z+*#],
            # and a dialed "h", to [fastagi-bad-exten], where the extension is "s".
            guarded = _GUARDED.fullmatch(call.exten) and _GUARDED.fullmatch(call.callerid)
            guarded = guarded and call.exten != "h"
            logged = call if guarded else dataclasses.replace(call, exten="s")
            result.log.append(log_line("NOTICE", logged, result.callid, line))
        return result

    async def _dialogue(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        url: str,
        call: Call,
    ) -> CallResult:
        started = time.monotonic()
        serial = next(_channel_ids)
        result = CallResult(callid=f"C-{serial:08x}")
        lines = LineWriter(writer.transport)
        for line in environment_lines(call, url, serial):
            lines.write(line)
        await writer.drain()
        variables = dict(call.functions())
        dead = False
        hangup_at = started + call.hangup_after if call.hangup_after is not None else None
        while time.monotonic() - started < self.hold_limit:
            timeout = self.hold_limit - (time.monotonic() - started)
            if hangup_at is not None and not dead:
                timeout = max(0.0, min(timeout, hangup_at - time.monotonic()))
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
            except TimeoutError:
                if hangup_at is not None and not dead and time.monotonic() >= hangup_at:
                    dead = True
                    result.agistatus = "HANGUP"
                    await self._write(lines, "HANGUP\n")
                    continue
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed: AGISIGHUP=yes makes Asterisk write HANGUP, then close.
                await self._write(lines, "HANGUP\n")
                break
            if reader._buffer:  # a real Asterisk would not read these until the next write
                result.pipelined += 1
            line = raw[:-1].decode("utf-8", errors="replace")
            if line.endswith("\r"):
                result.crlf += 1
            result.commands.append(line)
            if line.lower().startswith("failure"):
                result.agistatus = "FAILURE"
                await self._write(lines, "HANGUP\n")
                break
            answer = self._execute(line, call, variables, result, dead)
            if answer == "HANGUP-COMMAND":
                dead = True
                result.agistatus = "HANGUP"
                await self._write(lines, "200 result=1\n")
                await self._write(lines, "HANGUP\n")
                continue
            await self._write(lines, answer)
        result.seconds = time.monotonic() - started
        return result

    @staticmethod
    async def _write(lines: LineWriter, text: str) -> None:
        lines.write_answer(text)

    def _execute(
        self, line: str, call: Call, variables: dict[str, str], result: CallResult, dead: bool
    ) -> str:
        words = split_words(line)
        upper = [w.upper() for w in words]
        for size in (3, 2, 1):
            name = " ".join(upper[:size])
            if name in _HANDLERS or name in DEAD_FORBIDDEN:
                break
        else:
            return "510 Invalid or unknown command\n"
        if dead and name in DEAD_FORBIDDEN:
            return "511 Command Not Permitted on a dead channel or intercept routine\n"
        if name == "HANGUP":
            return "HANGUP-COMMAND"
        if name not in _HANDLERS:
            return "200 result=0\n"
        args = words[size:]
        answer = _HANDLERS[name](args, call, variables, result)
        if answer is None:
            usage = USAGE.get(name, [""])
            body = "\n".join(usage)
            return (
                "520-Invalid command syntax.  Proper usage follows:\n"
                f"{body}\n520 End of proper usage.\n"
            )
        return answer


def _get_variable(args, call, variables, result):
    if not args:
        return None
    value = variables.get(args[0])
    if value is None or (args[0].startswith("CHANNEL(") and value == ""):
        return "200 result=0\n"
    return f"200 result=1 ({value})\n"


def _get_full_variable(args, call, variables, result):
    if not args:
        return None
    return f"200 result=1 ({expand(args[0], variables)})\n"


def _set_variable(args, call, variables, result):
    if len(args) < 2:
        return None
    variables[args[0]] = result.variables[args[0]] = args[1]
    return "200 result=1\n"


def _exec(args, call, variables, result):
    if not args:
        return None
    app, options = args[0].lower(), (args[1] if len(args) > 1 else "")
    if app == "mset":
        return _mset(options, variables, result)
    if app != "log":
        return "200 result=-2\n"
    level, _, message = options.partition(",")
    result.log.append(log_line(level, call, result.callid, message))
    return "200 result=0\n"


def log_line(level: str, call: Call, callid: str, message: str) -> str:
    """A Log() line as Asterisk's log file holds it (app_verbose: "Ext. <exten>: ")."""
    stamp = time.strftime("%b %e %T")
    return f"[{stamp}] {level.upper()}[{call.threadid[-4:]}][{callid}] Ext. {call.exten}: {message}"


_GUARDED = re.compile(r"[0-9a-zA-Z+*#]*")  # what the shipped dialplan's guards let through
# The shipped dialplan's Log() text (the seed's line).
SEED_NOTICE = (
    "Incoming SIP connection from unknown peer failed for {} - Unknown connection from peer"
)


def notice_step(call: Call, variables: dict[str, str]) -> str:
    """What the shipped dialplan's [fastagi-notice] logs after AGI() ("" for nothing): the
    NOTICE for SCREEN_NOTICE when the server set it; when no server screened the call
    (SCREEN_COUNTED unset), for the address the channel driver knows."""
    address = variables.get("SCREEN_NOTICE", "")
    if not address and not variables.get("SCREEN_COUNTED"):
        if call.channel_type == "SIP":
            address = call.source
        elif call.channel_type == "PJSIP":
            address = call.remote_addr().rpartition(":")[0].strip("[]")
    return SEED_NOTICE.format(address) if address else ""


def _mset(options, variables, result):
    """pbx_builtin_setvar_multiple: up to 99 pairs split by the app parser (commas
    outside quotes, parentheses and brackets; quotes and backslashes removed), each
    split at its first '='; a pair without '=' is skipped with a warning."""
    for pair in separate_args(options)[:99]:
        name, sep, value = pair.partition("=")
        if sep:
            variables[name] = result.variables[name] = value
    return "200 result=0\n"


def _verbose(args, call, variables, result):
    return "200 result=1\n" if args else None


def _noop(args, call, variables, result):
    return "200 result=0\n"


def _channel_status(args, call, variables, result):
    return "200 result=4\n"


_HANDLERS = {
    "GET VARIABLE": _get_variable,
    "GET FULL VARIABLE": _get_full_variable,
    "SET VARIABLE": _set_variable,
    "EXEC": _exec,
    "VERBOSE": _verbose,
    "NOOP": _noop,
    "CHANNEL STATUS": _channel_status,
    "ANSWER": _noop,
}
