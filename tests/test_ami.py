"""The strict AMI reader (fastagi/ami.py) and the attempt rules (fastagi/auth.py), on the
raw Asterisk 22.10.1 captures (tests/data/ami) and on hostile variants of them."""

from __future__ import annotations

import collections
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastagi.addresses import AddressSet
from fastagi.ami import (
    TERMINATOR,
    Message,
    action,
    parse_message,
    parse_remote_address,
    security_event,
)
from fastagi.ami_emulator import captured_events
from fastagi.auth import ATTEMPT_SECONDS, Attempts, AuthWatcher
from tests.harness import settings as config_settings

DATA = Path(__file__).parent / "data" / "ami"
CAPTURES = ("ami-raw.bin", "ami-noanon-raw.bin", "ami-extra-raw.bin")
SMUGGLED = ipaddress.ip_address("203.0.113.9")
# what the lab's recorder flagged (`!!` in shared/asterisk/asterisk22/ami-*-raw.txt):
# bare CR/LF inside a line, two RemoteAddress lines, a line that is not `Key: value`
FLAGGED = {"ami-raw.bin": 3, "ami-noanon-raw.bin": 56, "ami-extra-raw.bin": 2}
# Every attempt in the captures, by address, counted once (FailedACL, InvalidAccountID,
# InvalidPassword, ChallengeResponseFailed; index.md lists the steps):
EXPECTED = {
    # svcrack's 3 responses on one Call-ID, svwar's 2 REGISTERs, 2 wrong AMI secrets,
    # 2 unknown AMI users (the bare-CR AMI user name is untrusted: not counted)
    "127.0.0.1": 9,
    "127.0.0.42": 6,  # 1 FailedACL + 5 ChallengeResponseFailed (2 smuggling ones untrusted)
    "127.0.0.43": 1,  # FailedACL (its smuggling ChallengeResponseFailed is untrusted)
    "127.0.0.50": 3,
    "127.0.0.51": 1,
    "127.0.0.53": 2,
    "127.0.0.54": 1,
    "127.0.0.60": 7,  # 7 REGISTERs of an unknown user, 4 events each without [anonymous]
    "127.0.0.61": 6,
    "127.0.0.62": 7,  # forged RemoteAddress in the From user: the clean ChallengeResponseFailed
    "127.0.0.63": 7,
    "127.0.0.64": 7,
    "::/64": 8,  # ::1: 1 wrong password + 7 bare-CR From users (counted as its /64)
}


def frames(name: str) -> list[bytes]:
    return [e[: -len(TERMINATOR)] for e in captured_events((DATA / name).read_bytes())]


def trusted_events(name: str):
    for frame in frames(name):
        try:
            yield security_event(parse_message(frame))
        except ValueError:
            continue


@pytest.mark.parametrize("name", CAPTURES)
def test_the_smuggled_address_never_comes_out_of_a_capture(name: str) -> None:
    events = list(trusted_events(name))
    assert events, "the capture has trusted events"
    assert all(e.address != SMUGGLED for e in events)
    untrusted = [m for m in map(parse_message, frames(name)) if m.problem]
    assert len(untrusted) == FLAGGED[name]
    # every untrusted message of the captures does name the smuggled address somewhere
    raw = [f for f in frames(name) if parse_message(f).problem]
    assert all(b"203.0.1" in f for f in raw)


def test_captures_count_each_attempt_once_at_its_true_address() -> None:
    watcher = AuthWatcher(config_settings().auth, None, None, AddressSet([]))  # type: ignore[arg-type]
    for name in CAPTURES:
        for frame in frames(name):
            watcher.handle(parse_message(frame))
    queued = collections.Counter(
        watcher.queue.get_nowait()[0] for _ in range(watcher.queue.qsize())
    )
    assert dict(queued) == EXPECTED


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("IPV4/UDP/127.0.0.50/54798", "127.0.0.50"),
        ("IPV4/TCP/127.0.0.51/47817", "127.0.0.51"),
        ("IPV6/UDP/::1/36783", "::1"),
        ("IPV6/UDP/2001:db8::9/5060", "2001:db8::9"),
        ("IPV6/TLS/::ffff:192.0.2.7/5061", "192.0.2.7"),  # one spelling per caller
    ],
)
def test_remote_address_forms(value: str, address: str) -> None:
    assert str(parse_remote_address(value)) == address


@pytest.mark.parametrize(
    "value",
    [
        "IPV4/UDP/203.0.1",  # the cut-off forgery of ami-noanon-raw.bin
        "IPV4/UDP/203.0.113.9",
        "IPV4/UDP/::1/5060",  # family does not match
        "IPV6/UDP/127.0.0.1/5060",
        "IPV6/UDP/[::1]/5060",
        "IPV6/UDP/fe80::1%eth0/5060",
        "IPV4/UDP/127.0.0.1/0",
        "IPV4/UDP/127.0.0.1/65536",
        "IPV4/UDP/127.0.0.1/5060/x",
        "IPV4/udp/127.0.0.1/5060",
        " IPV4/UDP/127.0.0.1/5060",
        "IPV4/UDP/127.0.0.1/50 60",
        "",
    ],
)
def test_remote_address_refuses_anything_else(value: str) -> None:
    with pytest.raises(ValueError):
        parse_remote_address(value)


# -- hostile variants ------------------------------------------------------------------

TRUE_REMOTE = "IPV4/UDP/192.0.2.50/5060"
HEAD = (
    b"Event: ChallengeResponseFailed\r\nPrivilege: security,all\r\n"
    b"EventTV: 2026-12-02T11:41:05.021+0000\r\nSeverity: Error\r\nService: PJSIP\r\n"
    b"EventVersion: 1\r\nAccountID: "
)
# pieces an attacker strings together in a value Asterisk writes raw
PIECES = st.sampled_from(
    [
        b"\r",
        b"\n",
        b"\r\n",
        b"\r\n\r\n",
        b": ",
        b":",
        b"RemoteAddress: IPV4/UDP/203.0.113.9/5060",
        b"RemoteAddress:IPV4/UDP/203.0.113.9",
        b"LocalAddress: IPV4/UDP/127.0.0.1/5080",
        b"SessionID: x",
        b"Event: ChallengeResponseFailed",
        b"Privilege: security,all",
        b"EventTV: 2026-12-02T11:41:05.021+0000",
        b"Severity: Error",
        b"Service: PJSIP",
        b"EventVersion: 1",
        b"AccountID: 100",
        b"IPV6/UDP/2001:db8::66/5060",
        b"100",
        b" ",
        b"\x00",
        b"\xff",
    ]
)
# A From user part reaches AccountID URL-decoded (CRLF included) but cut at 36 bytes;
# the Call-ID is SessionID. Both come before RemoteAddress.
SHORT = st.lists(PIECES, max_size=8).map(b"".join).filter(lambda b: len(b) <= 36)
# The digest response comes after RemoteAddress, any length, CR and LF, but pjproject
# ends a header line at CRLF: no CRLF CRLF (in the captures only a bare CR got through).
RESPONSE = (
    st.lists(PIECES, max_size=12)
    .map(b"".join)
    .filter(lambda b: TERMINATOR not in b + b"\r\n" and TERMINATOR not in b"\r\n" + b)
)


def hostile_stream(account: bytes, session: bytes, response: bytes) -> bytes:
    """An event as Asterisk writes it, the attacker's text raw in AccountID, SessionID
    and Response."""
    return (
        HEAD
        + account
        + b"\r\nSessionID: "
        + session
        + b"\r\nLocalAddress: IPV4/UDP/127.0.0.1/5080\r\nRemoteAddress: "
        + TRUE_REMOTE.encode()
        + b"\r\nChallenge: 1796211665/649de47a\r\nResponse: "
        + response
        + b"\r\nExpectedResponse: \r\n\r\n"
    )


@settings(max_examples=500, deadline=None)
@given(SHORT, SHORT, RESPONSE)
def test_hostile_values_never_forge_or_shift_the_address(
    account: bytes, session: bytes, response: bytes
) -> None:
    """Framed as the stream must be (at CRLF CRLF), every message that comes out as a
    trusted event names the true address; one with a bare CR or LF in a value is untrusted
    (a whole CRLF makes lines no reader can tell from Asterisk's: they are judged by
    the header order and the duplicate rule, and the address stays the true one)."""
    stream = hostile_stream(account, session, response)
    messages = [parse_message(f) for f in stream.split(TERMINATOR)[:-1]]
    for message in messages:
        try:
            event = security_event(message)
        except ValueError:
            continue
        assert event.remote == TRUE_REMOTE
    values = (account + session + response).replace(b"\r\n", b"")
    if len(messages) == 1 and (b"\r" in values or b"\n" in values):
        assert messages[0].problem


def test_a_key_twice_or_a_bad_line_is_untrusted() -> None:
    clean = hostile_stream(b"100", b"abc@lab", b"c6a6")[: -len(TERMINATOR)]
    assert not parse_message(clean).problem
    assert "twice" in parse_message(clean + b"\r\nRemoteAddress: IPV4/UDP/203.0.113.9/1").problem
    assert parse_message(clean + b"\r\nno colon here").problem
    assert parse_message(clean + b"\r\nBad Key: x").problem
    # an event not starting with Asterisk's common header is no security event
    moved = clean.replace(b"Privilege: security,all\r\n", b"") + b"\r\nPrivilege: security,all"
    with pytest.raises(ValueError):
        security_event(parse_message(moved))


def test_actions_refuse_line_breaks() -> None:
    assert action(Action="Ping") == b"Action: Ping\r\n\r\n"
    with pytest.raises(ValueError):
        action(Action="Login", Username="x\r\nAction: Originate")


# -- one attempt, one count --------------------------------------------------------------


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_attempt_rules() -> None:
    clock = Clock()
    seen = Attempts(clock)
    remote = "IPV4/UDP/192.0.2.1/5060"
    crf, iaid = "ChallengeResponseFailed", "InvalidAccountID"
    # without [anonymous]: InvalidAccountID twice, then the response: one attempt
    assert [seen.is_new("s1", remote, n) for n in (iaid, iaid, crf)] == [True, False, False]
    # a new password on the same Call-ID counts (svcrack)
    assert seen.is_new("s1", remote, iaid) is False
    assert seen.is_new("s1", remote, crf) is True
    # the same session from another port is another attempt (AMI reuses SessionIDs)
    assert seen.is_new("s1", "IPV4/UDP/192.0.2.1/5061", iaid) is True
    # a Call-ID repeated forever still counts once per ATTEMPT_SECONDS
    clock.now += ATTEMPT_SECONDS
    assert seen.is_new("s1", remote, iaid) is True
    assert seen.is_new("", remote, iaid) is True  # nothing ties it: always counted
    assert seen.is_new("", remote, iaid) is True


def test_untrusted_is_logged_once_a_minute(caplog) -> None:
    watcher = AuthWatcher(config_settings().auth, None, None, AddressSet([]))  # type: ignore[arg-type]
    bad = Message(problem="bare CR or LF inside a value", first="ChallengeResponseFailed")
    with caplog.at_level("WARNING", logger="fastagi.auth"):
        outcomes = {watcher.handle(bad) for _ in range(500)}
    assert outcomes == {"untrusted"}
    assert len([r for r in caplog.records if "untrusted" in r.getMessage()]) == 1
    sample = watcher.metrics.events.labels("ChallengeResponseFailed", "untrusted")
    assert sample._value.get() == 500
