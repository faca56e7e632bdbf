"""The `screen` route end to end, against the emulated Asterisk 20 (embedded store)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import pytest

from fastagi import emulator
from fastagi.emulator import Call, FakeAsterisk, environment_block
from tests.harness import running_server

DATA = Path(__file__).parent / "data"
SEED_ARGS = "${SIPCHANINFO(recvip)},${EXTEN},${CHANNEL(recvip)}"
# The seed dialplan's NOTICE line for the captured call, as a real Asterisk 20 logged it.
SEED_NOTICE = (
    "[Nov 24 22:00:38] NOTICE[619][C-0000004b] Ext. 7001: Incoming SIP connection "
    "from unknown peer failed for 127.0.0.6 - Unknown connection from peer"
)


def _shape(line: str) -> str:
    """A log line without its date, thread id and call id."""
    return re.sub(
        r"^\[[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\] (\w+)\[\d+\]\[C-[0-9a-f]{8}\]", r"\1", line
    )


def test_emulator_writes_the_captured_environment_block_byte_for_byte():
    captured = (DATA / "agi-env-chan_sip.bin").read_bytes()
    call = Call(source="127.0.0.6", agi_args=SEED_ARGS, uniqueid="1795557632.50")
    first, second = environment_block(call, "agi://127.0.0.1:4573/screen", 0x32)
    assert first + second == captured
    assert first.endswith(b"agi_context: from-sip-external\n")  # the two segments seen


def test_captured_call_gets_the_seed_notice_and_is_counted():
    # the capture came from 127.0.0.6; loopback is protected (never counted), so the
    # same call from a public address
    async def main():
        async with running_server() as srv:
            # a From user the shipped dialplan's caller-ID guard lets through ("anonymous-
            # scanner" has a '-': its NOTICE would say "Ext. s", from [fastagi-bad-exten])
            call = Call(
                source="198.51.100.6", agi_args=SEED_ARGS, uniqueid="1795557632.50", callerid="x"
            )
            return await srv.call(call)

    result = asyncio.run(main())
    assert result.variables == {
        "SCREEN_RESULT": "COUNTED",
        "SCREEN_COUNTED": "yes",
        "SCREEN_COUNT": "1",
        "SCREEN_NOTICE": "198.51.100.6",  # the shipped dialplan logs the NOTICE for it
    }
    notice = SEED_NOTICE.replace("127.0.0.6", "198.51.100.6")
    assert [_shape(line) for line in result.log] == [_shape(notice)]
    # two round trips: the resync that asks for the address, then every variable at once
    assert [c.split()[:2] for c in result.commands] == [["GET", "FULL"], ["EXEC", "MSet"]]
    assert result.pipelined == 0 and result.crlf == 0
    assert result.agistatus == "SUCCESS"


def test_threshold_bans_and_later_calls_are_banned_at_once(caplog):
    async def main():
        async with running_server(SCREENING_THRESHOLD="3", SCREENING_BAN_TIME="1h") as srv:
            results = [await srv.call(Call(source="198.51.100.4")) for _ in range(4)]
            return results, await srv.store.banned()

    results, banned = asyncio.run(main())
    assert [r.variables["SCREEN_RESULT"] for r in results] == [
        "COUNTED",
        "COUNTED",
        "BANNED",
        "BANNED",
    ]
    assert [r.variables["SCREEN_COUNT"] for r in results] == ["1", "2", "3", "4"]
    until = int(results[2].variables["SCREEN_BAN_UNTIL"])
    assert abs(until - (time.time() + 3600)) < 5
    assert results[3].variables["SCREEN_BAN_UNTIL"] == str(until)
    assert "SCREEN_BAN_UNTIL" not in results[0].variables
    assert list(banned) == ["198.51.100.4"]
    # the ban is logged once, not once per call from the banned address
    ban_lines = [r for r in caplog.records if "banned until" in r.getMessage()]
    assert [r.getMessage().split()[0] for r in ban_lines] == ["198.51.100.4"]


def test_repeat_offender_ban_time_grows_by_the_factor_and_is_capped():
    async def main():
        async with running_server(
            SCREENING_THRESHOLD="1",
            SCREENING_BAN_TIME="1h",
            SCREENING_BAN_TIME_FACTOR="3",
            SCREENING_BAN_TIME_MAX="5h",
        ) as srv:
            lengths = []
            for _ in range(4):
                result = await srv.call(Call(source="198.51.100.5"))
                lengths.append(int(result.variables["SCREEN_BAN_UNTIL"]) - time.time())
                await srv.store.unban(["198.51.100.5"])
            record = await srv.store.record("198.51.100.5")
            return lengths, record

    lengths, record = asyncio.run(main())
    hours = [round(seconds / 3600, 1) for seconds in lengths]
    assert hours == [1.0, 3.0, 5.0, 5.0]  # 1h, 1h*3, 1h*9 capped at 5h, still 5h
    assert record["bans"] == "4"


def test_ignored_addresses_are_never_counted():
    async def main():
        async with running_server(
            SCREENING_IGNORE='["203.0.113.0/24", "2001:db8:1::/48"]', SCREENING_THRESHOLD="1"
        ) as srv:
            v4 = await srv.call(Call(source="203.0.113.200"))
            v6 = await srv.call(Call(source="2001:db8:1::7", channel_type="PJSIP"))
            return v4, v6, await srv.store.banned(), await srv.store.counted()

    v4, v6, banned, counted = asyncio.run(main())
    ignored = {"SCREEN_RESULT": "IGNORED", "SCREEN_COUNTED": "no", "SCREEN_REASON": "ignore"}
    assert v4.variables == ignored and v6.variables == ignored
    assert v4.log == v6.log == []  # deliberately not counted: no NOTICE either
    assert banned == {} and counted == {}


def test_pjsip_ipv6_address_comes_from_remote_addr_without_port_or_brackets():
    async def main():
        async with running_server() as srv:
            call = Call(source="2001:db8::9", source_port=5062, channel_type="PJSIP")
            result = await srv.call(call)
            return result, await srv.store.counted()

    result, counted = asyncio.run(main())
    assert result.variables["SCREEN_RESULT"] == "COUNTED"
    assert counted == {"2001:db8::/64": 1}  # counted as its /64; the NOTICE names the caller
    assert result.log[0].endswith("failed for 2001:db8::9 - Unknown connection from peer")


def test_source_argument_is_used_only_for_channels_without_an_address():
    async def main():
        async with running_server() as srv:
            local = await srv.call(
                Call(channel_type="Local", exten="5550001", agi_args="192.0.2.44:5060,${EXTEN}")
            )
            # On a SIP channel, a SOURCE argument is ignored: Asterisk's answer wins.
            sip = await srv.call(Call(source="192.0.2.45", agi_args="198.51.100.99"))
            missing = await srv.call(Call(channel_type="Local"))
            garbage = await srv.call(Call(channel_type="Local", agi_args="not-an-ip"))
            return local, sip, missing, garbage, await srv.store.counted()

    local, sip, missing, garbage, counted = asyncio.run(main())
    assert local.variables["SCREEN_RESULT"] == "COUNTED"
    assert sip.variables["SCREEN_RESULT"] == "COUNTED"
    assert counted == {"192.0.2.44": 1, "192.0.2.45": 1}
    assert missing.variables["SCREEN_RESULT"] == "ERROR"
    assert "SOURCE" in missing.variables["SCREEN_ERROR"]
    assert garbage.variables["SCREEN_RESULT"] == "ERROR"


def test_unknown_route_sets_error_and_counts_nothing():
    async def main():
        async with running_server() as srv:
            result = await srv.call(Call(source="192.0.2.50"), route="nosuch?x=1")
            return result, await srv.store.counted()

    result, counted = asyncio.run(main())
    assert result.variables == {
        "SCREEN_RESULT": "ERROR",
        "SCREEN_COUNTED": "no",
        "SCREEN_ERROR": "unknown route",
    }
    assert counted == {}


def test_caller_hangup_mid_session_is_still_counted():
    async def main():
        async with running_server() as srv:
            return await srv.call(
                Call(source="192.0.2.51", hangup_after=0.0)
            ), await srv.store.counted()

    result, counted = asyncio.run(main())
    assert result.agistatus == "HANGUP"
    assert counted == {"192.0.2.51": 1}


def test_server_close_then_asterisk_hangup_line_is_a_normal_end():
    """Asterisk writes HANGUP after our close (AGISIGHUP=yes): not a caller hangup."""

    async def main():
        async with running_server() as srv:
            result = await srv.call(Call(source="192.0.2.52"))
            return result, srv.server.stats

    result, stats = asyncio.run(main())
    assert result.agistatus == "SUCCESS"
    assert stats.protocol_errors == 0 and stats.timeouts == 0


def test_allowed_clients_refuses_others_with_nothing_executed():
    async def main():
        async with running_server(SERVER_ALLOWED_CLIENTS='["10.9.9.9/32"]') as srv:
            return await srv.call(Call(source="192.0.2.53")), await srv.store.counted()

    result, counted = asyncio.run(main())
    assert result.commands == [] and result.variables == {}
    assert counted == {}


def test_sessions_over_max_sessions_are_answered_and_closed_at_once():
    """Every slot holds a session past its environment (here: one that never answers
    the resync, as a stalled Asterisk would): a new call is answered ERROR at once."""

    async def main():
        async with running_server(SERVER_MAX_SESSIONS="2", SERVER_SESSION_TIMEOUT="2s") as srv:
            host, port = srv.target[6:].split("/")[0].split(":")
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
            for n, (_, writer) in enumerate(idle):
                writer.write(b"".join(environment_block(Call(), srv.target, n)))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            result = await srv.call(Call(source="192.0.2.54", callerid="scanner"))
            took = time.monotonic() - started
            for _, writer in idle:
                writer.close()
            return result, took, srv.server.stats.refused_busy

    result, took, refused = asyncio.run(main())
    # No SCREEN_COUNTED: the shipped dialplan logs the NOTICE with the channel's address.
    assert result.variables == {"SCREEN_RESULT": "ERROR", "SCREEN_ERROR": "busy"}
    assert [_shape(line) for line in result.log] == [
        _shape(SEED_NOTICE.replace("127.0.0.6", "192.0.2.54"))
    ]
    assert took < 0.5 and refused == 1


@pytest.mark.parametrize("channel_type", ["SIP", "PJSIP"])
def test_no_command_is_pipelined_or_ends_in_crlf(channel_type):
    async def main():
        async with running_server(SCREENING_THRESHOLD="2") as srv:
            return [
                await srv.call(Call(source="192.0.2.60", channel_type=channel_type))
                for _ in range(3)
            ]

    for result in asyncio.run(main()):
        assert result.pipelined == 0 and result.crlf == 0
        assert all(not c.endswith("\r") for c in result.commands)


def test_emulator_answers_like_asterisk():
    """The emulator itself: 510, 520 block, dead-channel 511, functions in GET VARIABLE."""

    async def server(reader, writer):
        lines = []
        while (line := await reader.readline()) != b"\n":
            lines.append(line)
        answers = []
        for command in [
            b"FOOBAR\n",
            b"GET VARIABLE CHANNEL(recvip)\n",
            b"GET VARIABLE\n",
            b"HANGUP\n",
            b"ANSWER\n",
            b'EXEC Log "NOTICE,hi there"\n',
        ]:
            writer.write(command)
            answer = await reader.readline()
            if answer.startswith(b"520-"):
                while not answer.endswith(b"520 End of proper usage.\n"):
                    answer += await reader.readline()
            if command == b"HANGUP\n":
                answer += await reader.readline()
            answers.append(answer)
        results.append(answers)
        writer.close()

    results: list = []

    async def main():
        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        outcome = await FakeAsterisk().call(f"agi://127.0.0.1:{port}/x", Call(source="192.0.2.9"))
        srv.close()
        return outcome

    outcome = asyncio.run(main())
    answers = results[0]
    assert answers[0] == b"510 Invalid or unknown command\n"
    assert answers[1] == b"200 result=1 (192.0.2.9)\n"
    assert answers[2].startswith(b"520-Invalid command syntax.  Proper usage follows:\n")
    assert answers[3] == b"200 result=1\nHANGUP\n"
    assert answers[4].startswith(b"511 ")
    assert answers[5] == b"200 result=0\n"
    assert outcome.agistatus == "HANGUP"
    assert outcome.log[0].endswith("Ext. 7001: hi there")


def _answer_commands(result) -> list[str]:
    """The commands after the resync: how the server told Asterisk the result."""
    return result.commands[1:]


def test_variables_are_set_in_one_round_trip_and_an_error_text_unchanged():
    async def main():
        async with running_server(SCREENING_THRESHOLD="2") as srv:
            counted = await srv.call(Call(source="192.0.2.70"))
            banned = await srv.call(Call(source="192.0.2.70"))
        with socket.socket() as closed:  # a port nothing listens on: ERROR with a text
            closed.bind(("127.0.0.1", 0))
            nowhere = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
            async with running_server(nowhere) as srv:
                failed = await srv.call(Call(source="192.0.2.71"))
        return counted, banned, failed

    counted, banned, failed = asyncio.run(main())
    assert _answer_commands(counted) == [
        'EXEC MSet "SCREEN_RESULT=COUNTED,SCREEN_COUNTED=yes,SCREEN_COUNT=1,'
        'SCREEN_NOTICE=192.0.2.70"'
    ]
    until = banned.variables["SCREEN_BAN_UNTIL"]
    assert _answer_commands(banned) == [
        f'EXEC MSet "SCREEN_RESULT=BANNED,SCREEN_COUNTED=yes,SCREEN_COUNT=2,'
        f'SCREEN_BAN_UNTIL={until},SCREEN_NOTICE=192.0.2.70"'
    ]
    # A blank inside our double quotes reaches MSet unchanged (res_agi's parse_args).
    assert _answer_commands(failed) == [
        'EXEC MSet "SCREEN_RESULT=ERROR,SCREEN_COUNTED=unknown,'
        'SCREEN_ERROR=store unavailable,SCREEN_NOTICE=192.0.2.71"'
    ]
    assert failed.variables["SCREEN_ERROR"] == "store unavailable"
    assert failed.log[0].endswith("failed for 192.0.2.71 - Unknown connection from peer")


def test_an_asterisk_without_mset_still_gets_every_variable(monkeypatch):
    exec_app = emulator._HANDLERS["EXEC"]

    def no_mset(args, call, variables, result):
        if args and args[0].lower() == "mset":
            return "200 result=-2\n"  # what res_agi answers for an unknown application
        return exec_app(args, call, variables, result)

    monkeypatch.setitem(emulator._HANDLERS, "EXEC", no_mset)

    async def main():
        async with running_server(SCREENING_THRESHOLD="1") as srv:
            return await srv.call(Call(source="192.0.2.72"))

    result = asyncio.run(main())
    assert result.variables["SCREEN_RESULT"] == "BANNED"
    assert result.variables["SCREEN_COUNT"] == "1"
    assert int(result.variables["SCREEN_BAN_UNTIL"]) > time.time()
    assert [c.split()[:2] for c in _answer_commands(result)] == [
        ["EXEC", "MSet"],
        *[["SET", "VARIABLE"]] * 5,
    ]


def test_emulator_writes_like_res_agi_one_write_per_line_and_answer_nagle_on(monkeypatch):
    """res_agi's ast_agi_send: one write(2) per env line, per answer, per part of a 520
    block, on a socket without TCP_NODELAY (Asterisk never sets it)."""
    writes: list[bytes] = []
    nodelay: list[int] = []
    real_write = emulator.os.write

    def spy(fd: int, data: bytes) -> int:
        if fd == sockets[0]:
            writes.append(bytes(data))
        return real_write(fd, data)

    sockets: list[int] = []
    real_init = emulator.LineWriter.__init__

    def init(self, transport):
        real_init(self, transport)
        sockets.append(self.fd)
        sock = transport.get_extra_info("socket")
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(emulator.os, "write", spy)
    monkeypatch.setattr(emulator.LineWriter, "__init__", init)

    async def main():
        async def server(reader, writer):
            await reader.readuntil(b"\n\n")
            writer.write(b"GET VARIABLE\n")  # no name: a 520 usage block
            await reader.readuntil(b"520 End of proper usage.\n")
            writer.write(b"NOOP\n")
            await reader.readuntil(b"\n")
            writer.close()

        listener = await asyncio.start_server(server, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            return await FakeAsterisk(hold_limit=5).call(f"agi://127.0.0.1:{port}/screen", call)

    call = Call(source="198.51.100.6", agi_args=SEED_ARGS, uniqueid="1795557632.50")
    asyncio.run(main())
    env = emulator.environment_lines(call, "agi://127.0.0.1:0/screen", 0)
    assert nodelay == [0]
    assert len(writes) == len(env) + 5
    assert [w.split(b":")[0] for w in writes[: len(env)]] == [w.split(b":")[0] for w in env]
    assert writes[len(env) - 1] == b"\n"
    assert writes[len(env) :] == [
        b"520-Invalid command syntax.  Proper usage follows:\n",
        b"\n".join(line.encode() for line in emulator.USAGE["GET VARIABLE"]) + b"\n",
        b"520 End of proper usage.\n",
        b"200 result=0\n",
        b"HANGUP\n",
    ]
