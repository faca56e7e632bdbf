"""Nothing unseen: every guest call is counted by the server or leaves the seed's NOTICE
line in Asterisk's log, whatever went wrong (issue 14).

Each case runs the shipped dialplan file itself (tests/dialplan_run.py) for a call whose
AGI() is the emulator talking to a real server, and checks what a log-scraping jail and
the store see: the NOTICE lines with their address, and the count.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from fastagi.emulator import Call, CallResult, FakeAsterisk, environment_block, notice_step
from tests.dialplan_run import Run, run_call
from tests.harness import free_port, running_server

TAIL = " - Unknown connection from peer"


def notice(address: str, exten: str = "7001") -> str:
    return (
        f"NOTICE Ext. {exten}: Incoming SIP connection from unknown peer failed for {address}{TAIL}"
    )


def via(target: str, hold: float = 10.0, asterisk: str = "", connect: float = 2.0):
    """AGI() as the emulator plays it against `target`'s host and port, without the
    emulator's own NOTICE step (the dialplan file runs its own)."""
    base = target.rsplit("/", 1)[0]

    async def agi(url: str, call: Call) -> CallResult:
        url = url.replace("agi://127.0.0.1:4573", base)
        fake = FakeAsterisk(
            hold_limit=hold, asterisk=asterisk, notice_step=False, connect_timeout=connect
        )
        return await fake.call(url, call)

    return agi


def emulated(run: Run, call: Call) -> list[str]:
    """What the emulator's built-in NOTICE step says for the same answers."""
    line = notice_step(call, run.agi[-1].variables) if run.agi else ""
    return [line] if line else []


def shipped_lines(run: Run) -> list[str]:
    return [line.split(": ", 1)[1] for line in run.log]


def guest(**fields: object) -> Call:
    """A guest call whose caller ID passes the dialplan's guard (the emulator's default
    `anonymous-scanner` has a '-', which sends it to [fastagi-bad-exten])."""
    return Call(callerid="scanner", **fields)  # type: ignore[arg-type]


CALLS = {
    "chan_sip": (guest(source="192.0.2.31"), "192.0.2.31"),
    "PJSIP": (guest(source="192.0.2.32", channel_type="PJSIP", source_port=5072), "192.0.2.32"),
    "PJSIP IPv6": (
        guest(source="2001:db8:5::7", channel_type="PJSIP", source_port=5062),
        "2001:db8:5::7",
    ),
}


@pytest.mark.parametrize("name", CALLS)
def test_counted_call_logs_the_seed_notice_once_from_the_dialplan(name):
    """notice_by = "dialplan" (the default): the server sends no EXEC Log; the file logs
    the line from SCREEN_NOTICE, byte for byte the seed's text, with the caller's address."""
    call, address = CALLS[name]

    async def main():
        async with running_server() as srv:
            return await run_call(call, via(srv.target)), await srv.store.counted()

    run, counted = asyncio.run(main())
    assert run.log == [notice(address)]
    assert shipped_lines(run) == emulated(run, call)
    assert run.agi[0].variables["SCREEN_COUNTED"] == "yes"
    assert not any(c.startswith("EXEC Log") for c in run.agi[0].commands)
    assert sum(counted.values()) == 1 and run.cause == "21"


@pytest.mark.parametrize("name", CALLS)
def test_server_down_the_dialplan_logs_the_notice_with_the_drivers_address(name):
    """No listener: AGISTATUS=FAILURE, nothing set; the address comes from CHANNEL(recvip)
    (chan_sip) or CHANNEL(pjsip,remote_addr) without port and brackets (PJSIP)."""
    call, address = CALLS[name]
    run = asyncio.run(run_call(call, via(f"agi://127.0.0.1:{free_port()}/screen")))
    assert run.agi[0].agistatus == "FAILURE"
    assert run.log == [notice(address)] and run.cause == "21"
    assert shipped_lines(run) == emulated(run, call)


def test_connect_timeout_is_logged_by_the_dialplan():
    """A server whose accept queue is full (SYNs dropped): res_agi gives up after
    MAX_AGI_CONNECT, AGISTATUS=FAILURE, and the dialplan logs the NOTICE."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = []
        for _ in range(3):  # fill the accept queue; nobody accepts
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            waiting.append(client)
        try:
            call = guest(source="192.0.2.44")
            agi = via(f"agi://127.0.0.1:{port}/screen", connect=0.3)
            run = asyncio.run(run_call(call, agi))
        finally:
            for client in waiting:
                client.close()
    assert run.agi[0].agistatus == "FAILURE" and run.log == [notice("192.0.2.44")]


def test_busy_at_max_sessions_is_logged_and_refusals_are_counted_and_summarised(caplog):
    """Refused at max_sessions: one MSet (SCREEN_RESULT=ERROR, SCREEN_ERROR=busy, no
    SCREEN_COUNTED), the dialplan logs the NOTICE; the server counts the refusals by
    reason and logs one line for the first, a summary for the rest."""

    async def main():
        async with running_server(SERVER_MAX_SESSIONS="1", SERVER_SESSION_TIMEOUT="3s") as srv:
            host, port = srv.target[6:].split("/")[0].split(":")
            _, stuck = await asyncio.open_connection(host, int(port))
            stuck.write(b"".join(environment_block(Call(), srv.target, 1)))  # never answers
            await asyncio.sleep(0.1)
            runs = [await run_call(guest(source="192.0.2.33"), via(srv.target)) for _ in range(3)]
            stuck.close()
            srv.server.refusals.close()  # what the next summary would have said
            return runs, srv.server.stats.refused_busy, await srv.store.counted()

    runs, refused, counted = asyncio.run(main())
    for run in runs:
        assert run.agi[0].variables == {"SCREEN_RESULT": "ERROR", "SCREEN_ERROR": "busy"}
        assert run.log == [notice("192.0.2.33")]
    assert refused == 3 and counted == {}
    lines = [r.getMessage() for r in caplog.records if r.name == "fastagi.server"]
    assert len(lines) == 2, lines
    assert "max_sessions 1 busy" in lines[0]
    assert lines[1].startswith("refused 2 FastAGI connections more: 2 busy (max_sessions)")


def test_wrong_key_is_logged_by_the_dialplan():
    async def main():
        async with running_server(SERVER_KEY="k" * 32) as srv:
            return await run_call(guest(source="192.0.2.34"), via(srv.target))

    run = asyncio.run(main())
    assert run.agi[0].variables == {} and run.log == [notice("192.0.2.34")]


def test_store_error_reports_unknown_and_the_notice_is_logged():
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"

        async def main():
            async with running_server(nowhere, SCREENING_LOG_NOTICE="false") as srv:
                return await run_call(guest(source="192.0.2.35"), via(srv.target))

        run = asyncio.run(main())
    variables = run.agi[0].variables
    assert variables["SCREEN_RESULT"] == "ERROR" and variables["SCREEN_COUNTED"] == "unknown"
    assert run.log == [notice("192.0.2.35")]  # even with log_notice = false


def test_store_failures_are_logged_as_a_few_summary_lines(caplog):
    """A Redis outage under a flood: one line for the first call whose count is unknown,
    then one summary line (every 10 s while it goes on, and at stop), not one per call."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"

        async def main():
            async with running_server(nowhere) as srv:
                return [await srv.call(Call(source="192.0.2.45")) for _ in range(20)]

        results = asyncio.run(main())
    assert {r.variables["SCREEN_COUNTED"] for r in results} == {"unknown"}
    lines = [r.getMessage() for r in caplog.records if "count unknown" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("count unknown for a call from 192.0.2.45: Redis screening step")
    assert "the NOTICE is logged" in lines[0]
    assert lines[1].startswith("19 more calls with their count unknown: 19 store step failed")


def test_a_session_ended_without_an_answer_is_logged_by_the_dialplan():
    """The server reads the call and closes without a word (it crashed, restarted, or
    ended the session at session_timeout): no SCREEN_COUNTED, the dialplan logs it."""

    async def closer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        writer.close()

    async def main():
        server = await asyncio.start_server(closer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run_call(guest(source="192.0.2.36"), via(f"agi://127.0.0.1:{port}/screen"))

    run = asyncio.run(main())
    assert run.agi[0].agistatus == "SUCCESS" and run.agi[0].variables == {}
    assert run.log == [notice("192.0.2.36")]


def test_a_stalled_redis_reports_unknown_and_the_call_is_counted_when_it_resumes(own_redis):
    """The bug of issue 14: a session told "not counted" after a Redis stall was counted
    once Redis resumed. Now it says SCREEN_COUNTED=unknown (and the NOTICE is logged),
    which the later count proves right."""

    async def main():
        async with running_server(
            own_redis.url, SERVER_SESSION_TIMEOUT="2s", REDIS_TIMEOUT="100ms"
        ) as srv:
            await srv.call(Call(source="192.0.2.37"))  # connection pooled, script loaded
            own_redis.proc.send_signal(19)  # SIGSTOP: the script is sent, never answered
            try:
                run = await run_call(guest(source="192.0.2.37"), via(srv.target))
            finally:
                own_redis.proc.send_signal(18)  # SIGCONT: Redis runs what it received
            for _ in range(100):
                if (await srv.store.counted()).get("192.0.2.37") == 2:
                    break
                await asyncio.sleep(0.02)
            return run, await srv.store.counted()

    run, counted = asyncio.run(main())
    assert run.agi[0].variables["SCREEN_COUNTED"] == "unknown"
    assert run.log == [notice("192.0.2.37")]
    assert counted == {"192.0.2.37": 2}  # it was counted after all: "unknown" was true


def test_log_notice_false_logs_nothing_for_counted_calls():
    async def main():
        async with running_server(SCREENING_LOG_NOTICE="false") as srv:
            return await run_call(guest(source="192.0.2.38"), via(srv.target))

    run = asyncio.run(main())
    assert run.agi[0].variables["SCREEN_COUNTED"] == "yes" and run.log == []


def test_notice_by_agi_logs_once_through_exec_log_for_other_dialplans():
    """notice_by = "agi": the server writes the NOTICE (EXEC Log), sets no SCREEN_NOTICE,
    so the shipped file adds nothing; a call it could not count still gets one line."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"

        async def main():
            async with running_server(SCREENING_NOTICE_BY="agi") as srv:
                counted = await run_call(guest(source="192.0.2.39"), via(srv.target))
            async with running_server(
                nowhere, SCREENING_NOTICE_BY="agi", SCREENING_LOG_NOTICE="false"
            ) as srv:
                failed = await run_call(guest(source="192.0.2.40"), via(srv.target))
            return counted, failed

        counted, failed = asyncio.run(main())
    for run, address in ((counted, "192.0.2.39"), (failed, "192.0.2.40")):
        result = run.agi[0]
        assert "SCREEN_NOTICE" not in result.variables and run.log == []
        assert [line.split(": ", 1)[1] for line in result.log] == [
            notice(address).split(": ", 1)[1]
        ]
    assert [c.split()[:2] for c in counted.agi[0].commands] == [
        ["GET", "FULL"],
        ["EXEC", "Log"],
        ["EXEC", "MSet"],
    ]


def test_ignored_callers_are_neither_counted_nor_logged_and_banned_ones_are_logged():
    async def main():
        async with running_server(
            SCREENING_IGNORE='["203.0.113.0/24"]', SCREENING_THRESHOLD="1"
        ) as srv:
            ignored = await run_call(guest(source="203.0.113.5"), via(srv.target))
            banned = await run_call(guest(source="192.0.2.41"), via(srv.target))
            return ignored, banned

    ignored, banned = asyncio.run(main())
    assert ignored.agi[0].variables["SCREEN_COUNTED"] == "no" and ignored.log == []
    assert banned.agi[0].variables["SCREEN_RESULT"] == "BANNED"
    assert banned.log == [notice("192.0.2.41")] and banned.cause == "21"


@pytest.mark.parametrize("exten", ["h", "-", "9\n[Nov 24 22:00:00] NOTICE[1]"])
def test_odd_extensions_are_screened_too(exten):
    """A guest dialing "h" reaches the h extension while the channel is up (HANGUPCAUSE
    0); "-" and line feeds go through the guard: all screened, logged as Ext. s."""

    async def main():
        async with running_server() as srv:
            run = await run_call(guest(source="192.0.2.42", exten=exten), via(srv.target))
            emulated = await srv.call(guest(source="192.0.2.43", exten=exten))
            return run, emulated, await srv.store.counted()

    run, emulated, counted = asyncio.run(main())
    assert counted == {"192.0.2.42": 1, "192.0.2.43": 1}
    assert run.log == [notice("192.0.2.42", "s")]
    # the emulator's own NOTICE step says the same (its guard: "Ext. s")
    assert [line.partition("] NOTICE[")[2].partition("] ")[2] for line in emulated.log] == [
        notice("192.0.2.43", "s").removeprefix("NOTICE ")
    ]


def test_a_normal_hangup_runs_h_without_a_second_screening():
    async def main():
        async with running_server() as srv:
            run = await run_call(guest(source="192.0.2.43"), via(srv.target))
            return run, await srv.store.counted()

    run, counted = asyncio.run(main())
    assert len(run.agi) == 1 and counted == {"192.0.2.43": 1}
