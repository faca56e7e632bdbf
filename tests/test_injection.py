"""Attacker-controlled dialed numbers (shared/asterisk/attacker-controlled-exten.txt).

chan_sip URL-decodes the Request-URI user part into ${EXTEN} and agi_dnid, so one
INVITE can forge environment lines, end the block early, forge `200 result=` answers
and shift or swallow AGI() arguments. Whatever the dialed text, only the true
caller may be counted, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastagi.emulator import Call, environment_block
from tests.harness import counted_as, running_server

DATA = Path(__file__).parent / "data"
SEED_ARGS = "${SIPCHANINFO(recvip)},${EXTEN},${CHANNEL(recvip)}"
FORGED = "203.0.113.9"

# The Request-URI user parts sent in the lab, by section of the capture.
SECTIONS = {
    2: "559%0Aagi_arg_3%3A%20203.0.113.9%0A%0Aagi_x%3A%20y",
    3: "560%2C203.0.113.9",
    4: "558%22quote",
    5: "556%0D%0A[Nov%2024%2022",
    7: "562%0A200%20result=1%20(203.0.113.9)%0Aagi_arg_3%3A%20203.0.113.9"
    "%0A%0A200%20result=1%20(203.0.113.9)",
}
# Variants derived from them: several forged lines, forged answers after the blank
# line, forged keys that precede agi_dnid in a real block, HANGUP and 520 lookalikes.
VARIANTS = [
    "1%0A%0A200%20result=1%20(203.0.113.9)%0A200%20result=1%20(203.0.113.9)",
    "2%0Aagi_type%3A%20Local%0Aagi_arg_1%3A%20203.0.113.9%0A%0A",
    "3%0Aagi_network_script%3A%20other%0A%0A200%20result=1%20(203.0.113.9%20x)",
    "4%0AHANGUP%0A%0A520-Invalid%0A200%20result=1%20(203.0.113.9)",
    "5%0D%0A%0D%0A200%20result=1%20(203.0.113.9)%0D%0A",
    "6%2C203.0.113.9%2C203.0.113.9%22(%0A%0A",
    "7%0A200%20result=1%20(2001%3Adb8%3A%3A9)%0A%0A",
]


def test_captured_bytes_of_sections_2_and_7_are_what_the_emulator_sends():
    for section, peer, serial, unique, name in [
        (2, "127.0.0.15", 0x4A, "1795558206.88", "inject-section2.bin"),
        (7, "127.0.0.18", 0x4E, "1795558274.92", "inject-section7.bin"),
    ]:
        call = Call.from_uri_user(
            SECTIONS[section], source=peer, agi_args=SEED_ARGS, uniqueid=unique
        )
        port = 4573 if section == 2 else 4577
        first, second = environment_block(call, f"agi://127.0.0.1:{port}/screen", serial)
        assert (first + second).startswith((DATA / name).read_bytes())


def test_captured_fragments_of_sections_3_4_5_are_reproduced():
    fragments = {
        3: b"agi_dnid: 560,203.0.113.9\n",
        4: b"agi_arg_2: 558quote,127.0.0.14\n\n",
        5: b"agi_arg_2: 556\r\n[Nov 24 22,127.0.0.14\n\n",
    }
    for section, fragment in fragments.items():
        call = Call.from_uri_user(SECTIONS[section], source="127.0.0.14", agi_args=SEED_ARGS)
        first, second = environment_block(call, "agi://127.0.0.1:4573/screen", 1)
        assert fragment in first + second
    call = Call.from_uri_user(SECTIONS[4], source="127.0.0.14", agi_args=SEED_ARGS)
    assert b"agi_arg_3" not in b"".join(environment_block(call, "agi://h/screen", 1))


async def _screen_all(srv, calls):
    return [await srv.call(call) for call in calls]


@pytest.mark.parametrize(
    "channel_type,source",
    [
        ("SIP", "192.0.2.17"),
        ("PJSIP", "192.0.2.18"),
        ("PJSIP", "2001:db8::18"),
    ],
)
def test_every_captured_injection_counts_only_the_true_caller(channel_type, source):
    users = list(SECTIONS.values()) + VARIANTS
    repeats = 5

    async def main():
        async with running_server(SCREENING_THRESHOLD="1000") as srv:
            calls = [
                Call.from_uri_user(u, source=source, channel_type=channel_type, agi_args=SEED_ARGS)
                for u in users
                for _ in range(repeats)
            ]
            results = await _screen_all(srv, calls)
            return results, await srv.store.counted(), await srv.store.totals(), srv

    results, counted, totals, srv = asyncio.run(main())
    assert counted == {counted_as(source): len(users) * repeats}
    assert FORGED not in counted
    assert all(r.variables["SCREEN_RESULT"] == "COUNTED" for r in results)
    assert all(r.pipelined == 0 for r in results)
    # the sessions with an early blank line or forged lines are logged as injections
    assert totals.get("injections", 0) >= repeats * 4
    assert srv.server.stats.protocol_errors == 0


def test_forged_source_argument_on_a_local_channel_is_refused():
    """Without an address of its own, a tampered env makes SOURCE untrusted: ERROR."""

    async def main():
        async with running_server() as srv:
            call = Call.from_uri_user(
                "9%0Aagi_arg_1%3A%20203.0.113.9%0A%0A",
                channel_type="Local",
                agi_args="192.0.2.30,${EXTEN}",
            )
            return await srv.call(call), await srv.store.counted()

    result, counted = asyncio.run(main())
    assert result.variables["SCREEN_RESULT"] == "ERROR"
    assert counted == {}


def test_injected_threshold_worth_of_calls_bans_the_caller_not_the_forged_address():
    async def main():
        async with running_server(SCREENING_THRESHOLD="3") as srv:
            calls = [
                Call.from_uri_user(SECTIONS[7], source="192.0.2.19", agi_args=SEED_ARGS)
                for _ in range(3)
            ]
            results = await _screen_all(srv, calls)
            return results, await srv.store.banned()

    results, banned = asyncio.run(main())
    assert results[-1].variables["SCREEN_RESULT"] == "BANNED"
    assert list(banned) == ["192.0.2.19"]


DIALED = st.lists(
    st.sampled_from(
        [
            *"0123456789+*#abc .:",
            "\n",
            "\r",
            ",",
            '"',
            "(",
            ")",
            "%",
            "200 result=1 (",
            "agi_arg_1: ",
            "203.0.113.9",
            "HANGUP",
            "\n\n",
        ]
    ),
    max_size=40,
).map("".join)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(dialed=DIALED, channel_type=st.sampled_from(["SIP", "PJSIP"]))
def test_any_dialed_number_counts_exactly_the_caller(dialed, channel_type):
    async def main():
        async with running_server(SCREENING_THRESHOLD="1000") as srv:
            call = Call(
                exten=dialed[:79],
                dnid=dialed,
                source="192.0.2.77",
                channel_type=channel_type,
                agi_args=SEED_ARGS,
            )
            result = await srv.call(call)
            return result, await srv.store.counted()

    result, counted = asyncio.run(main())
    assert counted == {"192.0.2.77": 1}
    assert result.variables.get("SCREEN_RESULT") == "COUNTED"
    assert result.pipelined == 0
