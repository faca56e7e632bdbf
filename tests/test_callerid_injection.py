"""Caller text forging AGI environment lines (issue 12, section 4).

chan_sip URL-decodes the From user into `agi_callerid`, which res_agi writes before the
`agi_arg_*` lines: a From user `x%0Aagi_arg_1%3A%20203.0.113.77` forged `agi_arg_1` on a
Local channel called without a SOURCE argument. The server trusts `agi_arg_*` only in a
block laid out exactly as res_agi writes it (tests/data: a real Asterisk 20 chan_sip and
Local block, a real Asterisk 22 PJSIP block and its injection captures).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastagi.agi import ASTERISK_KEYS, Environment, read_environment
from fastagi.emulator import Call, environment_block
from tests.harness import running_server

DATA = Path(__file__).parent / "data"
FORGED = "203.0.113.77"
CALLER = "192.0.2.61"
# A Local channel as the lab originated it (agi-env-chan_sip.txt section 4).
LOCAL = dict(
    channel_type="Local",
    exten="5550001",
    callerid="unknown",
    calleridname="unknown",
    callingpres=67,
    dnid="unknown",
    context="agi-local",
    priority=2,
    uniqueid="1795557783.68",
    threadid="140459784738496",
)


def local(**fields: object) -> Call:
    """A Local channel call; `fields` replace the lab's values (a SIP caller's From user)."""
    return Call(**dict(LOCAL, **fields))  # type: ignore[arg-type]


def parse(block: bytes) -> Environment:
    async def main() -> Environment:
        reader = asyncio.StreamReader()
        reader.feed_data(block)
        reader.feed_eof()
        return await read_environment(reader)

    return asyncio.run(main())


def blocks(data: bytes) -> list[bytes]:
    """Env blocks written one after the other, each ending at its first empty line."""
    return [part + b"\n\n" for part in data.split(b"\n\n") if part]


def test_real_blocks_of_asterisk_20_and_22_are_trusted():
    sip = parse((DATA / "agi-env-chan_sip.bin").read_bytes())
    pjsip = parse((DATA / "agi-env-pjsip.bin").read_bytes())
    local = parse((DATA / "agi-env-local.bin").read_bytes())
    assert (sip.tampered, pjsip.tampered, local.tampered) == ("", "", "")
    assert sip.args == ["", "7001", "127.0.0.6"] and pjsip.args == []
    assert local.args == ["127.0.0.1", "5550001"]
    assert pjsip.get("agi_version") == "22.10.1" and local.route == "screen"


def test_emulator_local_block_is_the_captured_one_byte_for_byte():
    call = local(agi_args="127.0.0.1,${EXTEN}")
    first, second = environment_block(call, "agi://127.0.0.1:4573/screen", 0)
    assert first + second == (DATA / "agi-env-local.bin").read_bytes()


def test_real_asterisk_22_injections_are_told_from_clean_blocks():
    """asterisk22/agi-env-pjsip-inject.raw.txt: 8 guest calls; the dialed numbers of the
    1st and 5th carried LF-forged lines, the others a comma, a quote, a CR, 120 digits,
    %00 and %41: only the two with a line feed are not res_agi's layout."""
    found = [
        bool(parse(b).tampered) for b in blocks((DATA / "agi-env-pjsip-inject.bin").read_bytes())
    ]
    assert found == [True, False, False, False, True, False, False, False]


def test_a_block_without_a_script_path_is_still_asterisks_layout():
    lines = (DATA / "agi-env-local.bin").read_bytes().split(b"\n")
    env = parse(b"\n".join(line for line in lines if b"agi_network_script" not in line))
    assert env.tampered == "" and env.route == "" and env.args == ["127.0.0.1", "5550001"]


@pytest.mark.parametrize("capture", ["agi-env-chan_sip.bin", "agi-env-local.bin"])
def test_any_added_moved_or_missing_line_before_the_arguments_is_tampering(capture):
    """Exhaustive over the real block: one forged line inserted at every place before
    the arguments (a forged argument, a copy of any key Asterisk writes), or one of
    Asterisk's lines missing, is never the layout res_agi writes."""
    lines = (DATA / capture).read_bytes()[:-2].split(b"\n")
    head = next(i for i, line in enumerate(lines) if line.startswith(b"agi_threadid")) + 1
    forged = [f"agi_arg_1: {FORGED}".encode(), b"agi_x: y", b"no colon"]
    forged += [f"{key}: {FORGED}".encode() for key in ASTERISK_KEYS]
    for place in range(1, head + 1):
        for line in forged:
            env = parse(b"\n".join([*lines[:place], line, *lines[place:]]) + b"\n\n")
            assert env.tampered and env.args == [], (place, line)
    for place in range(head):
        if lines[place].startswith(b"agi_network_script"):
            continue  # optional: absent when the URL has no path
        env = parse(b"\n".join(lines[:place] + lines[place + 1 :]) + b"\n\n")
        assert env.tampered and env.args == [], place


def test_the_from_user_of_the_issue_on_a_local_channel_counts_nothing(caplog):
    """From user `x%0Aagi_arg_1%3A%20203.0.113.77`, screening called with no SOURCE."""

    async def main():
        async with running_server() as srv:
            bare = await srv.call(local(callerid=f"x\nagi_arg_1: {FORGED}"))
            with_source = await srv.call(
                local(callerid=f"x\nagi_arg_1: {FORGED}", agi_args="192.0.2.30")
            )
            clean = await srv.call(local(agi_args="192.0.2.30"))
            return bare, with_source, clean, await srv.store.counted(), srv.server.stats

    bare, with_source, clean, counted, stats = asyncio.run(main())
    assert bare.variables["SCREEN_RESULT"] == "ERROR"
    assert with_source.variables["SCREEN_RESULT"] == "ERROR"
    assert "untrusted" in bare.variables["SCREEN_ERROR"]
    assert clean.variables["SCREEN_RESULT"] == "COUNTED"
    assert counted == {"192.0.2.30": 1}
    assert stats.injections == 2
    warnings = [r.getMessage() for r in caplog.records if "injection attempt" in r.getMessage()]
    assert len(warnings) == 2 and all("environment line 10 is not" in w for w in warnings)


# Where caller text lands in the block, and what chan_sip / res_pjsip let through.
FIELDS = ["callerid", "calleridname", "dnid", "rdnis", "exten"]  # exten: also agi_channel on Local
INJECTED = st.lists(
    st.sampled_from(
        [
            f"agi_arg_1: {FORGED}",
            "agi_arg_1: 2001:db8::77",
            f"agi_arg_2: {FORGED}",
            "agi_threadid: 1",
            "agi_type: Local",
            f"agi_network_script: screen?key=x&ip={FORGED}",
            f"200 result=1 ({FORGED})",
            "",
            "HANGUP",
            "x",
        ]
    ),
    min_size=1,
    max_size=4,
).map(lambda lines: "\n" + "\n".join(lines))


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    where=st.sampled_from(FIELDS),
    injected=INJECTED,
    prefix=st.sampled_from(["", "x", "anonymous", "+4930123"]),
    channel=st.sampled_from(["SIP", "PJSIP", "Local", "Local+SOURCE"]),
)
def test_a_line_feed_in_any_caller_field_never_counts_a_forged_address(
    where, injected, prefix, channel
):
    fields = {where: prefix + injected}
    if channel.startswith("Local"):
        call = local(agi_args=CALLER if channel == "Local+SOURCE" else "", **fields)
    else:
        call = Call(source=CALLER, channel_type=channel, **fields)  # type: ignore[arg-type]

    async def main():
        async with running_server(SCREENING_THRESHOLD="1000") as srv:
            result = await srv.call(call)
            return result, await srv.store.counted(), srv.server.stats.injections

    result, counted, injections = asyncio.run(main())
    assert injections == 1
    if channel.startswith("Local"):
        assert counted == {} and result.variables["SCREEN_RESULT"] == "ERROR"
    else:
        assert counted == {CALLER: 1} and result.variables["SCREEN_RESULT"] == "COUNTED"
    assert result.pipelined == 0
