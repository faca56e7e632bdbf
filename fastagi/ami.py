"""A strict reader of Asterisk's manager interface (AMI), for its security events.

Asterisk writes AMI values raw: a bare CR or LF, or a whole CRLF, that an attacker put
into a SIP header (the quoted `response=` of an Authorization, a From user part)
reaches the event as it came (shared/asterisk/asterisk22, ami-*-raw.bin). Splitting on
LF or `splitlines()`, letting the first or the last key win, or panoramisk's parser all
counted the forged `RemoteAddress: IPV4/UDP/203.0.113.9` in some captured events. So:

- a message ends at CRLF CRLF and its lines at CRLF, nothing else;
- every line is `Key: value`; a line with a bare CR or LF left in it, a line that is
  not `Key: value`, or a key seen twice makes the whole message *untrusted*: no field
  of it is believed, because we cannot tell which line Asterisk wrote;
- a security event must begin with Asterisk's common header, in Asterisk's order
  (Event ... LocalAddress, RemoteAddress), so a message forged whole inside a value
  would also have to forge that;
- the address is `RemoteAddress` only (`IPV4/UDP/<address>/<port>`,
  `IPV6/UDP/<address>/<port>`), parsed strictly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass, field

from fastagi.addresses import IPAddress

TERMINATOR = b"\r\n\r\n"
BANNER_PREFIX = b"Asterisk Call Manager/"
MAX_MESSAGE = 65536  # bytes; a security event is ~400, a longer "message" is not one
# The common header of every security event, in the order Asterisk writes it (captures:
# shared/asterisk/asterisk22): these six first, then `AccountID` (which AMI's own
# RequestBadFormat moves to the end) and always `SessionID, LocalAddress, RemoteAddress`
# next to each other, RemoteAddress at most the tenth line.
SECURITY_HEADER = ("Event", "Privilege", "EventTV", "Severity", "Service", "EventVersion")
ADDRESS_LINES = ("SessionID", "LocalAddress", "RemoteAddress")
ADDRESS_LAST_LINE = 9  # index of RemoteAddress when AccountID comes before it
# Every security event Asterisk 22 defines (include/asterisk/security_events_defs.h);
# a metric label is one of these or "other", never peer text.
SECURITY_EVENTS = (
    "FailedACL",
    "InvalidAccountID",
    "SessionLimit",
    "MemoryLimit",
    "LoadAverageLimit",
    "RequestNotSupported",
    "RequestNotAllowed",
    "AuthMethodNotAllowed",
    "RequestBadFormat",
    "SuccessfulAuth",
    "UnexpectedAddress",
    "ChallengeResponseFailed",
    "InvalidPassword",
    "ChallengeSent",
    "InvalidTransport",
)
# Informational events of a normal login: never a failure, whatever the config says.
NEVER_COUNTED = ("SuccessfulAuth", "ChallengeSent")
_KEY = re.compile(rb"[A-Za-z0-9_-]{1,64}")
_TRANSPORT = re.compile(r"[A-Z]{2,5}")


class AMIError(Exception):
    """The AMI peer is not one, refused us, or broke the protocol; the message says how."""


@dataclass(frozen=True)
class Message:
    """One AMI message. `problem` is empty when every line is Asterisk's own `Key: value`;
    otherwise it says why the message is untrusted and `fields` must not be read."""

    fields: dict[str, str] = field(default_factory=dict)
    problem: str = ""
    first: str = ""  # the first line's Event name (a metric label even when untrusted)

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


@dataclass(frozen=True)
class SecurityEvent:
    """A trusted security event: its name, the caller's address (and the whole
    RemoteAddress value, port included), the attempt's session."""

    name: str
    address: IPAddress
    remote: str
    session: str


def parse_message(frame: bytes) -> Message:
    """One message, without its CRLF CRLF: trusted fields, or the reason it is not."""
    fields: dict[str, str] = {}
    head = frame[:64].split(b"\r", 1)[0]
    first = head[7:].decode("ascii", "replace") if head.startswith(b"Event: ") else ""
    for line in frame.split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            return Message(problem="bare CR or LF inside a value", first=first)
        key, sep, value = line.partition(b": ")
        if not sep and line.endswith(b":"):  # Asterisk writes "Key: " for an empty value
            key, sep = line[:-1], b":"
        if not sep or not _KEY.fullmatch(key):
            return Message(problem="a line that is not 'Key: value'", first=first)
        name = key.decode("ascii")
        if name in fields:
            return Message(problem=f"key {name} seen twice", first=first)
        fields[name] = value.decode("utf-8", "replace")
    return Message(fields, first=first)


def parse_remote_address(value: str) -> IPAddress:
    """The address of `IPV4/UDP/127.0.0.50/54798` or `IPV6/UDP/::1/36783`; ValueError
    for anything else (a scope, brackets, a family that does not match the address)."""
    parts = value.split("/")
    if len(parts) != 4:
        raise ValueError(f"RemoteAddress {value[:80]!r} is not FAMILY/TRANSPORT/ADDRESS/PORT")
    family, transport, text, port = parts
    if not _TRANSPORT.fullmatch(transport) or not (port.isascii() and port.isdigit()):
        raise ValueError(f"RemoteAddress {value[:80]!r}: bad transport or port")
    if not 0 < int(port) < 65536:
        raise ValueError(f"RemoteAddress {value[:80]!r}: port out of range")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"RemoteAddress {value[:80]!r}: not an IP address") from None
    if family != f"IPV{address.version}" or "%" in text:
        raise ValueError(f"RemoteAddress {value[:80]!r}: family does not match the address")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # one spelling per caller, as addresses.parse_address
    return address


def security_event(message: Message) -> SecurityEvent:
    """The event of a trusted message; ValueError when it is not a well-formed one."""
    if message.problem:
        raise ValueError(message.problem)
    keys = tuple(message.fields)
    if keys[: len(SECURITY_HEADER)] != SECURITY_HEADER or "RemoteAddress" not in keys:
        raise ValueError("not a security event with Asterisk's common header")
    at = keys.index("RemoteAddress") - 2
    if keys[at : at + 3] != ADDRESS_LINES or at + 2 > ADDRESS_LAST_LINE:
        raise ValueError("not a security event with Asterisk's common header")
    if "security" not in message.get("Privilege").split(","):
        raise ValueError("not in the security class")
    return SecurityEvent(
        name=message.get("Event"),
        address=parse_remote_address(message.get("RemoteAddress")),
        remote=message.get("RemoteAddress"),
        session=message.get("SessionID"),
    )


def event_label(message: Message) -> str:
    """A bounded label for metrics: a known security event name or "other"."""
    return message.first if message.first in SECURITY_EVENTS else "other"


def action(**fields: str) -> bytes:
    """An AMI action; a value with CR or LF is refused (it would forge lines to Asterisk)."""
    out = []
    for key, value in fields.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"AMI {key}: CR or LF in the value")
        out.append(f"{key}: {value}\r\n")
    return ("".join(out) + "\r\n").encode("utf-8")


def _keepalive(sock: socket.socket | None) -> None:
    """Security events can be silent for hours: TCP keepalive finds a vanished peer
    (a host gone without a reset) within about a minute, and the watcher reconnects."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class Connection:
    """One AMI session over asyncio streams: banner, login, then messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._action_id = 0

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> Connection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_MESSAGE)
            _keepalive(writer.get_extra_info("socket"))
            connection = cls(reader, writer)
            try:
                banner = await reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                connection.close()
                raise AMIError("no AMI banner (is this Asterisk's manager port?)") from None
        if not banner.startswith(BANNER_PREFIX):
            connection.close()
            raise AMIError(f"not an AMI banner: {banner[:60]!r}")
        return connection

    async def read(self) -> Message:
        """The next message; AMIError at EOF or on a message longer than MAX_MESSAGE."""
        frame = b""
        while not frame:  # empty lines between messages are skipped, as pyst2 does
            try:
                frame = await self.reader.readuntil(TERMINATOR)
            except asyncio.IncompleteReadError:
                raise AMIError("AMI closed the connection") from None
            except asyncio.LimitOverrunError:
                raise AMIError(f"AMI sent more than {MAX_MESSAGE} bytes without an end") from None
            frame = frame[: -len(TERMINATOR)].lstrip(b"\r\n")
        return parse_message(frame)

    async def request(self, timeout: float, **fields: str) -> Message:
        """Send an action and wait for its response, skipping events meanwhile."""
        self._action_id += 1
        action_id = f"fastagi-{self._action_id}"
        self.writer.write(action(**fields, ActionID=action_id))
        async with asyncio.timeout(timeout):
            await self.writer.drain()
            while True:
                message = await self.read()
                if not message.problem and message.get("ActionID") == action_id:
                    return message

    async def login(self, username: str, secret: str, timeout: float) -> None:
        """Log in for security events only; AMIError when Asterisk refuses."""
        reply = await self.request(
            timeout, Action="Login", Username=username, Secret=secret, Events="security"
        )
        if reply.get("Response") != "Success":
            raise AMIError(f"AMI login as {username!r} refused: {reply.get('Message')!r}")

    def close(self) -> None:
        self.writer.transport.abort()
