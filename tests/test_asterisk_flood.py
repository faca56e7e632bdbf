"""The flood bench's arithmetic (bench/asterisk_flood.py): the criterion, the ladder,
sipp's files, the NOTICE count and the targets; and its floor peers' dialogue. No
Asterisk, no sipp, nothing timed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from fastagi.emulator import Call, FakeAsterisk
from tests.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import asterisk_flood as flood  # noqa: E402


def test_a_step_holds_only_with_every_call_answered_and_p99_within_50_ms() -> None:
    assert flood.held(1500, 1500, 0, 50.0)
    assert not flood.held(1500, 1500, 0, 50.1)
    assert not flood.held(1500, 1499, 1, 4.0)  # one call failed
    assert not flood.held(1500, 1499, 0, 4.0)  # one call never finished
    assert not flood.held(0, 0, 0, None)


def test_unseen_calls_are_bounded_from_the_two_totals() -> None:
    # the service logs and counts the same call: only bounds follow
    assert flood.unseen_bounds(sent=100, counted=100, logged=100) == (0, 0)
    assert flood.unseen_bounds(sent=100, counted=40, logged=30) == (30, 60)
    assert flood.unseen_bounds(sent=100, counted=0, logged=70) == (30, 30)


def run_ladder(capacity: int, resolution: float = 0.15) -> list[int]:
    tried: dict[int, bool] = {}
    while (rate := flood.next_rate(tried, resolution)) is not None:
        assert rate not in tried and len(tried) < 20
        tried[rate] = rate <= capacity
    return list(tried)


def test_the_ladder_doubles_then_bisects_to_the_resolution() -> None:
    rates = run_ladder(capacity=1000)
    assert rates[:4] == [200, 400, 800, 1600]
    best = max(r for r in rates if r <= 1000)
    above = min(r for r in rates if r > 1000)
    assert 0.85 * 1000 <= best <= 1000 and above - best <= 0.15 * best


def test_the_ladder_goes_down_when_the_first_step_fails_and_is_bounded() -> None:
    assert run_ladder(capacity=120)[:2] == [200, 100]
    assert run_ladder(capacity=10) == [200, 100, 50]  # nothing below MIN_RATE
    assert run_ladder(capacity=10**6)[-1] == flood.MAX_RATE


def test_the_cpu_rate_is_one_every_mode_held() -> None:
    assert flood.cpu_rate_for(200, [700, 800, 230, 260]) == 200
    assert flood.cpu_rate_for(200, [700, 800, 125, 140]) == 120
    assert flood.cpu_rate_for(200, [700, 0]) == flood.MIN_RATE


def test_sipp_files_are_read_from_their_last_row() -> None:
    stat = (
        "StartTime;TotalCallCreated;SuccessfulCall(C);FailedCall(C);\n"
        "x;600;300;0;\n"
        "y;1500;1497;3;\n"
    )
    assert flood.parse_sipp_stat(stat) == {"sent": 1500, "answered": 1497, "failed": 3}
    assert flood.parse_sipp_stat("") == {}
    rtt = "Date_ms;response_time_ms;rtd_no\n56.001;4;1\n108.001;12;1\n"
    assert flood.parse_sipp_rtt(rtt) == [4.0, 12.0]


def test_notices_are_counted_for_the_step_address_only() -> None:
    line = (
        "[Dec  2 16:15:19] NOTICE[123][C-00000001] Ext. 7001: Incoming SIP connection from "
        "unknown peer failed for {ip} - Unknown connection from peer"
    )
    lines = [line.format(ip=ip) for ip in ("192.0.2.10", "192.0.2.100", "192.0.2.10")]
    # the same text at another level is not the seed's line
    lines.append(line.format(ip="192.0.2.10").replace("NOTICE[", "WARNING["))
    log = "\n".join(lines)
    assert flood.count_notices(log, "192.0.2.10") == 2
    assert flood.count_notices(log, "192.0.2.100") == 1


def mode(held: int, p50: float, cpu: dict, unseen=(0, 0), emu: float | None = None) -> dict:
    m = {"held": held, "low": {"p50_ms": p50}, "cpu": {"rate": 200, "held": True, **cpu}}
    m["unseen"] = list(unseen)
    if emu is not None:
        m["emulator"] = {"cpu_ms": {"server": emu}}
    return m


def test_the_targets_are_judged_side_by_side() -> None:
    modes = {
        "alone": mode(1000, 1.4, {"asterisk": 1.6}),
        "floor": mode(900, 2.0, {"asterisk": 2.3, "server": 0.3}),
        "embedded": mode(450, 4.8, {"asterisk": 2.5, "server": 2.8}, unseen=(5, 9), emu=1.4),
        "redis": mode(880, 2.6, {"asterisk": 2.4, "server": 0.6, "redis": 0.1}, (0, 3), 0.55),
    }
    verdict = flood.verdicts(modes)
    embedded, redis = verdict["embedded"], verdict["redis"]
    assert embedded["1 held >= 0.9x floor, >= 0.8x alone"][1] is False
    assert redis["1 held >= 0.9x floor, >= 0.8x alone"][1] is True  # 0.98x, 0.88x
    assert embedded["2 server CPU <= 3x floor server"] == ("9.3x", False)
    assert redis["2 server CPU <= 3x floor server"][1] is True
    assert redis["2 all CPU <= 1.2x floor all"][1] is True  # 3.1 vs 2.6
    assert embedded["3 added p50 <= 1.5 ms"] == ("3.40 ms", False)
    assert redis["3 added p50 <= 1.5 ms"][1] is True
    assert embedded["4 unseen = 0 up to 2x held"] == ("5-9", False)
    assert redis["4 unseen = 0 up to 2x held"] == ("0-3", None)  # the bounds cannot tell
    assert embedded["emulator within 25%"][1] is False  # 2.0x
    assert redis["emulator within 25%"][1] is True


def test_a_step_is_its_calls_but_at_most_ten_seconds_of_them() -> None:
    assert flood.FULL.calls_at(400) == 1500
    assert flood.FULL.calls_at(100) == 1000
    assert flood.FULL.calls_at(20) == 500  # p99 still over 500 calls
    assert flood.QUICK.calls_at(1000) == 400


def test_the_seed_goes_where_the_stack_sends_its_guests(tmp_path: Path) -> None:
    (tmp_path / "sip.conf").write_text(
        "[general]\ncontext = from-chansip-external\nallowguest = yes\n\n"
        "[200]\ntype = friend\ncontext = from-internal\n"
    )
    (tmp_path / "pjsip.conf").write_text(
        "[transport-udp]\ntype = transport\n\n[anonymous]\ntype = endpoint\n"
        "context = from-sip-external\n\n[200]\ntype = endpoint\ncontext = from-internal\n"
        "[200]\ntype = aor\nmax_contacts = 1\n"
    )
    assert flood.guest_context(tmp_path, "chan_sip") == "from-chansip-external"
    assert flood.guest_context(tmp_path, "PJSIP") == "from-sip-external"
    seed = flood.seed_context("from-sip-external", "PJSIP")
    assert seed.startswith("[from-sip-external]\n") and "AGI" not in seed
    assert "Hangup(21)" in seed and "exten => h,1,Hangup()" in seed


@pytest.mark.parametrize("trips", [0, 2])
def test_the_floors_speak_as_res_agi_expects(trips: int) -> None:
    """The floor closes after the block (no variable set: the dialplan fails open and
    logs); the two-trip floor asks for the address and sets SCREEN_NOTICE to it, as a
    screener would, counting nothing. Driven by the emulator as Asterisk 22 PJSIP."""
    port = free_port()
    peer = ROOT / "bench" / "peers" / "floor_agi.py"
    listen = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(peer), "--listen", listen, "--trips", str(trips)])
    try:
        assert wait_for(lambda: _listening(port), timeout=10)
        asterisk = FakeAsterisk(asterisk="22.10.1-pjsip")
        call = Call(source="198.51.100.7", channel_type="PJSIP")
        result = asyncio.run(asterisk.call(f"agi://{listen}/screen", call))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if trips:
        assert result.variables["SCREEN_NOTICE"] == "198.51.100.7"
        assert result.variables["SCREEN_COUNTED"] == "yes"
    else:
        assert "SCREEN_NOTICE" not in result.variables


def _listening(port: int) -> bool:
    """The peer's port is bound (ss: a bare connect would be a session of its own)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())
