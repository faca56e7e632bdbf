"""A sans-socket FastAGI fuzz harness: the real server session code over in-memory streams.

One case = the bytes of an environment block plus, for every command the server sends,
the bytes "Asterisk" answers. The server code that runs is the production path:
`FastAGIServer._accept` (deadline, protocol errors, close), or quick.py's
`QuickSession` where the store has `screen_now`, -> `read_environment` ->
`Screener.screen` (nonce resync, ignore, NOTICE via EXEC Log, store step) ->
SET VARIABLE answers. Only the socket is replaced: the server's own `agi.SessionStream`
over a transport that answers each complete command line at once, from memory.

The caller's address is chosen by the harness and appears only in Asterisk's true
answer to the resync (the line carrying the server's nonce). The fuzzer controls
everything else: the environment block, stray and forged lines before and after the
true answer, the answers to every other command, HANGUP lines and EOF at any point.

Oracle (checked by `Fuzzer.check`):
- nothing escapes `_session` but the outcomes it handles itself (AGIProtocolError,
  ScreeningError -> SCREEN_RESULT=ERROR, timeouts, connection errors); no task error;
- the store is asked to count (and so ban) no address but the caller's. The one
  exception the design allows: a channel type with no address of its own (`Local`)
  whose environment arrived clean may be counted under its SOURCE argument. Clean is
  judged here, not by the server: the block's keys are exactly those of the emulator's
  res_agi block, then `agi_arg_1..N`, and no stray line came before the true answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
import re
from dataclasses import dataclass, field

from asterisk.agi import AGI

from fastagi.addresses import AddressError, AddressSet, Prefixes, parse_address, target_text
from fastagi.agi import MAX_LINE, AGISession, SessionStream
from fastagi.emulator import Call, environment_block
from fastagi.screening import Screener
from fastagi.server import FastAGIServer
from fastagi.store import Policy, Store, Verdict

FORGED = ["203.0.113.9", "2001:db8::9", "198.51.100.66", "10.0.0.1", "[2001:db8::9]:5060"]
CALLERS = [
    "192.0.2.17",
    "192.0.2.200",
    "2001:db8:1::17",
    "127.0.0.6",
    "192.0.2.17:5060",
    "[2001:db8:1::17]:5060",
]
NONCE = re.compile(rb"GET FULL VARIABLE \"([0-9a-f]{24}) ")


class UnexpectedOutcome(AssertionError):
    """The oracle failed: the message carries the reproducer."""


class PystLoopDetected(Exception):
    """pyst2's get_result kept reading past the end of the answer it was given."""


class _OneAnswer(io.StringIO):
    """The answer handed to pyst2. Its 520 branch loops `while line[:3] != '520'` and
    never stops at the end of input: an answer line `520 ...` (no `520-` opener) made
    it append '' forever, holding the event loop and eating all memory (24 GB here).
    This turns that loop into an exception the oracle reports."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.past_end = 0

    def readline(self, size: int = -1) -> str:  # type: ignore[override]
        line = super().readline(size)
        if not line:
            self.past_end += 1
            if self.past_end > 64:
                raise PystLoopDetected(
                    "pyst2 get_result read past the end of the answer "
                    "64 times (its endless 520 loop)"
                )
        return line


def _guarded_get_result(self: AGI, stdin: object = None) -> dict:
    if isinstance(self.stdin, io.StringIO) and not isinstance(self.stdin, _OneAnswer):
        self.stdin = _OneAnswer(self.stdin.getvalue())
    return AGI.get_result(self)


@contextlib.contextmanager
def pyst2_loop_guard():
    """Install the guard on AGISession for the duration (restored afterwards)."""
    had = "get_result" in AGISession.__dict__
    previous = AGISession.__dict__.get("get_result")
    AGISession.get_result = _guarded_get_result  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            AGISession.get_result = previous  # type: ignore[method-assign]
        else:
            del AGISession.get_result


class FakeStore:
    """Records which addresses the screening step was asked to count."""

    policy = Policy(5, 600, 3600, 2.0, 86400)
    quick = False  # no `screen_now`...
    soon = False  # ... nor `screen_soon`: every session is a task

    def __init__(self) -> None:
        self.screened: list[str] = []
        self.counts: dict[str, int] = {}

    async def screen(
        self, ip: str, injected: bool = False, threshold: int | None = None, country: str = ""
    ) -> Verdict:
        return self._step(ip)

    def _step(self, ip: str) -> Verdict:
        """Count one call from `ip`; banned from the fifth."""
        self.screened.append(ip)
        n = self.counts[ip] = self.counts.get(ip, 0) + 1
        return Verdict("BANNED" if n >= 5 else "COUNTED", n, 1.8e9 if n >= 5 else 0.0, n == 5)


class QuickFakeStore(FakeStore):
    """FakeStore with the embedded store's `screen_now`: every step but a new ban's."""

    quick = True

    def screen_now(
        self, ip: str, injected: bool = False, threshold: int | None = None, country: str = ""
    ) -> Verdict | None:
        if self.counts.get(ip, 0) + 1 == 5:
            return None  # the ban: the script runs (awaited), as in embedded.NativeScreen
        return self._step(ip)


class SoonFakeStore(FakeStore):
    """FakeStore as a real Redis on one shared connection: `screen_soon` sends the
    step, whoever waits for its reply hears of it a loop turn later, as FakeStore.screen's
    awaiting task does (store.Store.soon_verdict reads it)."""

    soon = True

    def screen_soon(
        self, ip: str, injected: bool = False, threshold: int | None = None, country: str = ""
    ) -> asyncio.Future:
        verdict = self._step(ip)  # as the script replies: ban end in ms
        until = int(verdict.ban_until * 1000)
        reply = [verdict.result.encode(), verdict.count, until, int(verdict.new_ban)]
        future = asyncio.get_running_loop().create_future()
        future.set_result(reply)  # its callbacks run a loop turn later, as Redis's would
        return future

    soon_verdict = staticmethod(Store.soon_verdict)

    def gave_up(self, sent: float) -> None:
        pass


class FakeAsteriskTransport:
    """The socket under the server's SessionStream: every complete command line the
    server writes gets its scripted answer, fed back into the stream."""

    def __init__(self, stream: SessionStream, case: Case) -> None:
        self.stream = stream
        self.case = case
        self.closed = False
        self.pending = b""
        self.commands: list[bytes] = []

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass  # everything is in memory already

    def resume_reading(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        self.pending += data
        while b"\n" in self.pending:
            line, _, self.pending = self.pending.partition(b"\n")
            self._answer(line)

    def _answer(self, command: bytes) -> None:
        if self.stream.at_eof:  # Asterisk has closed: nothing more comes
            return
        n = len(self.commands)
        self.commands.append(command)
        if n >= len(self.case.replies):
            if self.case.eof_after:
                self.stream.eof_received()
            else:
                self.stream.data_received(b"200 result=1\n")
            return
        reply = self.case.replies[n]
        match = NONCE.match(command)
        if match and reply.true_answer is not None:
            answer = b"200 result=1 (" + match.group(1) + b" " + reply.true_answer + b")\n"
            data = reply.before + answer + reply.after
        else:
            data = reply.before + reply.after
        if data:
            self.stream.data_received(data)
        if reply.eof:
            # Asterisk closes after its answer: the server may react to the answer first
            # (one loop turn), whether its session is a task or quick.py's callbacks.
            asyncio.get_running_loop().call_soon(self.stream.eof_received)


@dataclass
class Reply:
    """What Asterisk writes after one command. For the resync command `true_answer`
    (the caller's address as CHANNEL() renders it) is placed between before and after."""

    before: bytes = b""
    after: bytes = b""
    true_answer: bytes | None = None
    eof: bool = False


@dataclass
class Case:
    env: bytes
    caller: str
    replies: list[Reply] = field(default_factory=list)
    eof_after: bool = True  # after the scripted replies: EOF, else plain `200 result=1`
    env_eof: bool = False  # EOF right after the env bytes (truncated block)

    def __repr__(self) -> str:
        return (
            f"Case(env={self.env[:600]!r}, caller={self.caller!r}, replies="
            f"{[(r.before[:200], r.true_answer, r.after[:200], r.eof) for r in self.replies]}"
            f", eof_after={self.eof_after}, env_eof={self.env_eof})"
        )


IGNORE = AddressSet.parse(["127.0.0.0/8", "::1/128"])


def _address(text: str) -> str | None:
    """The store key of a caller at this address: its prefix (an IPv6 caller's /64),
    narrowed to the address where the prefix would cover an ignored one (screening.py)."""
    try:
        return target_text(Prefixes().target(parse_address(text), IGNORE))
    except (AddressError, ValueError):
        return None


# The keys res_agi writes, in order, as the emulator writes them (fastagi/emulator.py,
# byte for byte the captured block): the oracle's reference, independent of agi.py.
ASTERISK_LAYOUT = [
    line.partition(b": ")[0]
    for line in b"".join(environment_block(Call(), "agi://127.0.0.1:4573/screen", 0)).split(b"\n")
    if line
]


def _asterisk_layout(env: bytes) -> bool:
    """The block up to its empty line has exactly res_agi's keys, then agi_arg_1..N."""
    block, blank, _ = env.partition(b"\n\n")
    if not blank:
        return False
    keys = [line.partition(b": ")[0] for line in block.split(b"\n")]
    arguments = [f"agi_arg_{n}".encode() for n in range(1, len(keys) - len(ASTERISK_LAYOUT) + 1)]
    return keys == ASTERISK_LAYOUT + arguments


def _first_env_values(env: bytes) -> dict[str, str]:
    """The first occurrence of each key up to the first empty line (the server's rule)."""
    values: dict[str, str] = {}
    for raw in env.split(b"\n"):
        line = raw.decode("utf-8", errors="replace")
        if line == "":
            break
        key, sep, value = line.partition(": ")
        if sep and key not in values:
            values[key] = value
    return values


class Fuzzer:
    """Runs cases on one event loop against one server with a recording store."""

    def __init__(
        self,
        session_timeout: float = 2.0,
        quiet: bool = True,
        quick: bool = False,
        soon: bool = False,
    ):
        if quiet:  # thousands of injection warnings per second otherwise
            logging.getLogger("fastagi").setLevel(logging.CRITICAL)
        # quick: sessions start as the server starts them over a socket with a store
        # that has `screen_now` (quick.py), handed to a task where the server does so
        self.store = QuickFakeStore() if quick else SoonFakeStore() if soon else FakeStore()
        self.screener = Screener(self.store, IGNORE, log_notice=True, redis_budget=0.5)
        self.server = FastAGIServer(
            self.screener, AddressSet.parse(["127.0.0.1/32"]), 10**9, session_timeout
        )
        self.cases = 0
        self.task_errors: list[object] = []
        self.results: dict[str, int] = {}
        self.starved = 0
        # per case: what the server sent (nonces masked), counted, and how it ended
        self.transcript: list[tuple] = []

    def _loop_errors(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        self.task_errors.append(context.get("exception") or context.get("message"))

    async def run_case(self, case: Case) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_errors)
        stats = self.server.stats
        before_injections, before_timeouts = stats.injections, stats.timeouts
        self.store.screened.clear()
        results = dict(stats.results)
        server = self.server
        # the server's own stream, its session started as over a socket: a task at once,
        # or quick.py's (production paths); only the socket is fake
        if server.quick:
            stream = SessionStream(limit=MAX_LINE, opened=server._opened)
        else:
            stream = SessionStream(server._accept, MAX_LINE)
        transport = FakeAsteriskTransport(stream, case)
        with pyst2_loop_guard():
            stream.connection_made(transport)  # type: ignore[arg-type]
            stream.data_received(case.env)
            if case.env_eof:  # as after an answer (FakeAsteriskTransport._answer)
                asyncio.get_running_loop().call_soon(stream.eof_received)
            await self._drive(stream, case)
        changed = {
            k: v - results.get(k, 0) for k, v in stats.results.items() if v != results.get(k)
        }
        commands = [NONCE.sub(b'GET FULL VARIABLE "nonce ', c) for c in transport.commands]
        self.transcript.append((commands, list(self.store.screened), changed, stats.active))
        self.cases += 1
        if self.task_errors:
            raise UnexpectedOutcome(f"loop error {self.task_errors[0]!r} for {case!r}")
        if stats.timeouts != before_timeouts:
            raise UnexpectedOutcome(f"session hit its deadline with every byte given: {case!r}")
        self.check(case, injected=stats.injections != before_injections)

    async def _drive(self, stream: SessionStream, case: Case) -> None:
        session = stream.task
        for _ in range(100_000):
            await asyncio.sleep(0)
            session = session or stream.task  # a quick session handed over since
            if session is None and stream.listener is None:
                return  # screened without a task, or refused
            if session is not None and session.done():
                break
            if stream.waiting and not stream.at_eof:
                # The server waits for bytes the script does not have: Asterisk closes.
                self.starved += 1
                stream.eof_received()
        else:
            if session is not None:
                session.cancel()
            raise UnexpectedOutcome(f"session still running after 100,000 loop turns: {case!r}")
        try:
            session.result()
        except BaseException as error:  # the oracle: nothing may escape the session
            raise UnexpectedOutcome(
                f"{type(error).__name__}: {error} escaped for {case!r}"
            ) from error

    def check(self, case: Case, injected: bool) -> None:
        allowed = {_address(case.caller)}
        env = _first_env_values(case.env)
        clean = _asterisk_layout(case.env) and not injected
        if env.get("agi_type") not in ("SIP", "PJSIP") and clean:
            allowed.add(_address(env.get("agi_arg_1", "")))
        for ip in self.store.screened:
            if ip not in allowed:
                raise UnexpectedOutcome(f"counted {ip!r}, the caller is {case.caller!r}: {case!r}")
        for ip in self.store.screened:
            kind = "caller" if ip == _address(case.caller) else "source-arg"
            self.results[kind] = self.results.get(kind, 0) + 1


# -- case generation from a seeded PRNG (thousands of cases per second) ----------------

TOKENS = [
    b"",
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"HANGUP",
    b"hangup",
    b"HANGUP\n",
    b"200 result=1",
    b"200 result=0",
    b"200 result=-1",
    b"200 result=-2",
    b"200 result=1 (hangup)",
    b"200 result=1 ()",
    b"200 result=1 (203.0.113.9)",
    b"200 result=1 (2001:db8::9)",
    b"200 result=1 (0123456789abcdef01234567 203.0.113.9)",
    b"200 result=4",
    b"510 Invalid or unknown command",
    b"511 Command Not Permitted on a dead channel",
    b"520-Invalid command syntax.  Proper usage follows:",
    b"<literal>0</literal>",
    b"520 End of proper usage.",
    b"0520",
    b"0200 result=1",
    b"agi_arg_1: 203.0.113.9",
    b"agi_arg_2: 203.0.113.9",
    b"agi_type: Local",
    b"agi_type: SIP",
    b"agi_network_script: screen",
    b"agi_network_script: other",
    b"agi_request: agi://h/screen",
    b"agi_channel: Local/x",
    b"agi_arg_1: [2001:db8::9]:5060",
    b"agi_dnid: 1",
    b"agi_x: y",
    b"agi_",
    b": ",
    b":",
    b"\xff\xfe",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\x00",
    b"\x1b[2J",
    b"%0A",
    b"FAILURE",
    b"(",
    b")",
    b'"',
    b",",
    b"203.0.113.9",
    b"200",
    b"result=",
    b" ",
    b"9" * 79,
    b"A" * 300,
]


def _junk(rng: random.Random, max_tokens: int = 12) -> bytes:
    parts = []
    for _ in range(rng.randrange(max_tokens + 1)):
        roll = rng.random()
        if roll < 0.85:
            parts.append(rng.choice(TOKENS))
        elif roll < 0.995:
            parts.append(rng.randbytes(rng.randrange(1, 40)))
        elif roll < 0.999:
            parts.append(b"B" * rng.randrange(MAX_LINE - 50, MAX_LINE + 50))  # around the limit
        else:
            parts.append(b"C" * rng.randrange(MAX_LINE, 4 * MAX_LINE))  # huge line
    return b"".join(parts)


def _lines(rng: random.Random, max_lines: int = 6) -> bytes:
    return b"".join(_junk(rng, 6) + b"\n" for _ in range(rng.randrange(max_lines + 1)))


REAL_HEAD = (
    b"agi_network: yes\nagi_network_script: screen\nagi_request: agi://127.0.0.1:4573/screen\n"
    b"agi_channel: {type}/192.0.2.17-0000004a\nagi_language: en\nagi_type: {type}\n"
    b"agi_uniqueid: 1795558206.88\nagi_version: 20.20.1\nagi_callerid: scanner\n"
    b"agi_calleridname: lab caller\nagi_callingpres: 0\nagi_callingani2: 0\n"
    b"agi_callington: 0\nagi_callingtns: 0\nagi_dnid: "
)
REAL_MIDDLE = b"\nagi_rdnis: unknown\nagi_context: from-sip-external\nagi_extension: "
REAL_TAIL = (
    b"\nagi_priority: 6\nagi_enhanced: 0.0\nagi_accountcode: \nagi_threadid: 140459785762496\n"
)


def _true_answer(rng: random.Random, channel_type: bytes, caller: str) -> bytes:
    has_port = caller.startswith("[") or caller.count(":") == 1
    if channel_type == b"PJSIP" and not has_port:
        host = f"[{caller}]" if ":" in caller else caller
        return f"{host}:{rng.choice([5060, 5061, 1])}".encode()
    return caller.encode()


def random_case(rng: random.Random) -> Case:
    """Mostly the attacker's view (a real block, attacker text in the dialed number);
    sometimes a wholly random block."""
    caller = rng.choice(CALLERS)
    mode = rng.random()
    channel_type = rng.choice([b"SIP", b"PJSIP", b"SIP", b"PJSIP", b"Local", b"IAX2", b""])
    if mode < 0.75:
        exten = _junk(rng, 10) if rng.random() < 0.8 else rng.choice([b"7001", b"8011441295298642"])
        callerid = _junk(rng, 6) if rng.random() < 0.2 else b"scanner"  # the From user
        head = REAL_HEAD.replace(b"{type}", channel_type)
        head = head.replace(b"agi_callerid: scanner\n", b"agi_callerid: " + callerid + b"\n")
        env = head + exten + REAL_MIDDLE + exten[:79]
        env += REAL_TAIL
        if rng.random() < 0.5:
            args = rng.choice([b"", caller.encode(), b"203.0.113.9", _junk(rng, 3)])
            env += b"agi_arg_1: " + args + b"\n"
            if rng.random() < 0.5:
                env += b"agi_arg_2: " + exten + b"\nagi_arg_3: " + caller.encode() + b"\n"
        if rng.random() < 0.9:
            env += b"\n"  # else: the blank line is missing
    else:
        env = _lines(rng, 20)
        if rng.random() < 0.5:
            env = b"agi_network_script: screen\nagi_type: " + channel_type + b"\n" + env
        if rng.random() < 0.7:
            env += b"\n"
    if rng.random() < 0.02:  # the env cut short at a random byte
        env = env[: rng.randrange(len(env) + 1)]
    replies = []
    for n in range(rng.randrange(1, 8)):
        junk_rate = 0.6 if n == 0 else 0.15
        reply = Reply(
            before=_lines(rng, 4) if rng.random() < junk_rate else b"",
            after=_lines(rng, 2) if rng.random() < junk_rate / 3 else b"",
        )
        if n == 0 and rng.random() < 0.9:
            reply.true_answer = _true_answer(rng, channel_type, caller)
            if rng.random() < 0.05:
                reply.true_answer = rng.choice([b"", b"garbage", b"999.1.1.1", b"unknown"])
                caller = "invalid"
        elif rng.random() < 0.9:
            reply.before += rng.choice(
                [
                    b"200 result=1\n",
                    b"200 result=0\n",
                    b"HANGUP\n",
                    b"HANGUP\n200 result=1\n",
                    b"200 result=1\n",
                ]
            )
        reply.eof = rng.random() < 0.03
        replies.append(reply)
    return Case(env, caller, replies, eof_after=rng.random() < 0.3, env_eof=rng.random() < 0.03)


async def run_random(fuzzer: Fuzzer, seed: int, cases: int) -> None:
    rng = random.Random(seed)
    for _ in range(cases):
        await fuzzer.run_case(random_case(rng))
