"""The Asterisk 22.10.1 PJSIP sessions of the captures, replayed byte for byte through the
real server: every byte Asterisk wrote before its first answer (env blocks over UDP, TCP
and IPv6, and the injection INVITEs' blocks with their forged lines), written line by line
as res_agi does, then Asterisk's own answer to the resync (its captured form, with our
nonce) and to `EXEC MSet` (`200 result=0`). The true address is counted, nothing forged.
And the emulator, told to play Asterisk 22.10.1 (or 20.20.1), writes and answers as they did.
"""

from __future__ import annotations

import ast
import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastagi.emulator import Call, FakeAsterisk, environment_block, separate_args, split_words
from tests.harness import PJSIP_CAPTURED, counted_as, pjsip_captured_call, running_server
from tests.test_protect import EMPTY
from tests.test_screen_route import SEED_ARGS

DATA = Path(__file__).parent / "data" / "agi-pjsip-sessions.txt"
FORGED = "203.0.113.9"
REMOTE_ADDR = "${CHANNEL(pjsip,remote_addr)}"


@dataclass
class Session:
    answer: str  # Asterisk's answer to GET FULL VARIABLE "${CHANNEL(pjsip,remote_addr)}"
    prefix: bytes  # every byte it wrote before that answer
    commands: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The caller's address as the captured answer gives it (`ip:port`, `[v6]:port`)."""
        value = re.fullmatch(r"200 result=1 \((.*)\)", self.answer).group(1)  # type: ignore[union-attr]
        return value.rpartition(":")[0].strip("[]")


def sessions() -> list[Session]:
    found = []
    for line in DATA.read_text().splitlines():
        if line and not line.startswith("#"):
            answer, _, prefix = line.partition("\t")
            found.append(Session(answer, ast.literal_eval(prefix)))
    return found


async def replay(host: str, port: int, session: Session) -> None:
    """Asterisk's side: the captured bytes, one write per line, then its answers."""
    reader, writer = await asyncio.open_connection(host, port)
    for line in session.prefix.splitlines(keepends=True):
        writer.write(line)
        await writer.drain()
    while line := await reader.readline():
        command = line.decode()[:-1]
        session.commands.append(command)
        words = split_words(command)
        if words[:3] == ["GET", "FULL", "VARIABLE"]:
            nonce, _, expression = words[3].partition(" ")
            assert expression == REMOTE_ADDR, command
            answer = session.answer.replace("(", f"({nonce} ", 1)  # the captured "abc123" form
        elif words[:2] == ["EXEC", "MSet"]:
            for pair in separate_args(words[2]):
                name, _, value = pair.partition("=")
                session.variables[name] = value
            answer = "200 result=0"
        else:
            answer = "510 Invalid or unknown command"
        writer.write(f"{answer}\n".encode())
        await writer.drain()
    writer.write(b"HANGUP\n")  # AGISIGHUP: what Asterisk sent after our close
    writer.close()


def test_asterisk_22_sessions_count_the_true_address_and_never_the_forged_one():
    captured = sessions()
    assert len(captured) == 11  # 3 clean (UDP, TCP, IPv6) + 8 injection INVITEs

    async def main():
        async with running_server(
            SCREENING_IGNORE="[]", SCREENING_THRESHOLD="10", protected=EMPTY
        ) as srv:
            host, port = srv.target[6:].split("/")[0].split(":")
            for session in captured:
                await replay(host, int(port), session)
            return await srv.store.counted(), srv.server.stats

    counted, stats = asyncio.run(main())
    expected: dict[str, int] = {}
    for session in captured:
        expected[counted_as(session.address)] = expected.get(counted_as(session.address), 0) + 1
        # two round trips: the resync, then every variable in one MSet
        assert [c.split()[:2] for c in session.commands] == [["GET", "FULL"], ["EXEC", "MSet"]]
        assert session.variables["SCREEN_RESULT"] == "COUNTED"
        assert session.variables["SCREEN_COUNTED"] == "yes"
        assert session.variables["SCREEN_NOTICE"] == session.address
    assert counted == expected
    assert counted == {"127.0.0.40": 2, "::/64": 1, "127.0.0.81": 5, "127.0.0.82": 3}
    assert FORGED not in counted and not any(FORGED in s.commands[-1] for s in captured)
    assert stats.injections == 2  # the two blocks with forged lines (found by their place)


# -- the emulator says which Asterisk it plays ------------------------------------------


def test_the_emulator_playing_22_writes_the_captured_blocks_byte_for_byte():
    """FakeAsterisk(asterisk="22.10.1-pjsip"): PJSIP channels named after the endpoint,
    agi_version 22.10.1, and the dialed number cut at 79 in agi_dnid as in ${EXTEN}."""
    fake = FakeAsterisk(asterisk="22.10.1-pjsip")
    clean, long = sessions()[0], sessions()[8]
    call = fake.prepare(pjsip_captured_call())
    assert fake.prepare().channel_type == "PJSIP"  # a call of the driver of the Asterisk it plays
    assert b"".join(environment_block(call, "agi://127.0.0.1:4573/screen", 0)) == clean.prefix
    # with no Asterisk named, a PJSIP call is 22.10.1's too
    block = b"".join(environment_block(pjsip_captured_call(), "agi://127.0.0.1:4573/screen", 0))
    assert block == clean.prefix
    assert block == (DATA.parent / "agi-env-pjsip.bin").read_bytes()  # the first capture, alone
    dialed = "1234567890" * 12  # a 120-digit user part
    call = fake.prepare(Call.from_uri_user(dialed, **PJSIP_CAPTURED, uniqueid="1796211901.53"))
    block = b"".join(environment_block(call, "agi://127.0.0.1:4583/screen", 0x35))
    assert block == long.prefix


def test_the_emulator_playing_20_writes_the_chan_sip_capture_and_22_has_no_chan_sip():
    call = FakeAsterisk(asterisk="20.20.1-chan_sip").prepare(
        Call(source="127.0.0.6", agi_args=SEED_ARGS, uniqueid="1795557632.50")
    )
    captured = (DATA.parent / "agi-env-chan_sip.bin").read_bytes()
    assert b"".join(environment_block(call, "agi://127.0.0.1:4573/screen", 0x32)) == captured
    pjsip20 = FakeAsterisk(asterisk="20.20.1-pjsip").prepare()
    assert (pjsip20.channel_type, pjsip20.version) == ("PJSIP", "20.20.1")
    with pytest.raises(ValueError, match="no SIP channels"):
        FakeAsterisk(asterisk="22.10.1-pjsip").prepare(Call(channel_type="SIP"))
    with pytest.raises(ValueError, match="unknown Asterisk"):
        FakeAsterisk(asterisk="21.0.0-chan_sip")


def test_the_emulator_answers_the_22_probes_as_captured():
    """asterisk22/agi-env-pjsip.raw.txt: the answers of a real PJSIP channel."""

    async def probe(reader, writer):
        await reader.readuntil(b"\n\n")
        for command in PROBES:
            writer.write(command)
            answers.append(await reader.readline())
        writer.close()

    answers: list[bytes] = []

    async def main():
        server = await asyncio.start_server(probe, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            call = Call(source="127.0.0.40", source_port=34555, channel_type="PJSIP")
            await FakeAsterisk(asterisk="22.10.1-pjsip", notice_step=False).call(
                f"agi://127.0.0.1:{port}/screen", call
            )

    asyncio.run(main())
    assert answers == list(PROBES.values())


PROBES = {
    b'GET FULL VARIABLE "${CHANNEL(pjsip,remote_addr)}"\n': b"200 result=1 (127.0.0.40:34555)\n",
    b'GET VARIABLE "CHANNEL(pjsip,remote_addr)"\n': b"200 result=1 (127.0.0.40:34555)\n",
    b'GET FULL VARIABLE "${CHANNEL(recvip)}"\n': b"200 result=1 ()\n",
    b'GET VARIABLE "CHANNEL(recvip)"\n': b"200 result=0\n",
    b'GET FULL VARIABLE "${CHANNEL(channeltype)}"\n': b"200 result=1 (PJSIP)\n",
    b'GET FULL VARIABLE "${SIPCHANINFO(recvip)}"\n': b"200 result=1 ()\n",
    b'GET FULL VARIABLE "abc123 ${CHANNEL(pjsip,remote_addr)}"\n': (
        b"200 result=1 (abc123 127.0.0.40:34555)\n"
    ),
    b'EXEC MSet "SCREEN_RESULT=REC,SCREEN_COUNT=7,LAB_X=a:b"\n': b"200 result=0\n",
    b"GET VARIABLE SCREEN_COUNT\n": b"200 result=1 (7)\n",
    b"GET VARIABLE LAB_X\n": b"200 result=1 (a:b)\n",
    b"GET VARIABLE SCREEN_RESULT\n": b"200 result=1 (REC)\n",
    b"SET VARIABLE SCREEN_RESULT COUNTED_BY_RECORDER\n": b"200 result=1\n",
}
