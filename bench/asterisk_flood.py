#!/usr/bin/env python3
"""Flood a real Asterisk with guest INVITEs: what screening costs the PBX (issue 14).

    sudo .venv/bin/python bench/asterisk_flood.py --asterisk PREFIX22/inst \
        --asterisk PREFIX20/inst [--quick] [--pjsip-too] [--work DIR]

Each --asterisk is the install prefix of an Asterisk built by lab/asterisk/build.sh.
The stack flooded is chan_sip where the build has it (20), else PJSIP (22);
--pjsip-too adds PJSIP on a build that has both. For every stack, side by side in one
invocation, five modes, each on a freshly started Asterisk (lab/asterisk/lab.py's
namespaces and private config, verbose 0, NOTICE and worse logged to one file):

- alone:    the seed recipe, no AGI (Log the NOTICE, Hangup(21));
- floor:    the shipped dialplan calling bench/peers/floor_agi.py, which reads the
            environment block and closes (the cost of res_agi itself);
- trips:    the same peer with `--trips 2`: a screener's two round trips (the
            caller's address, one MSet) with nothing behind them, counting nothing
            (what the protocol itself costs; not a screening mode);
- embedded: the shipped dialplan calling `fastagi-ctl serve` on the embedded store;
- redis:    the same on a real redis-server.

sipp (in the attacker namespace, one source address per step, no SDP) sends guest
INVITEs; every call is answered 403. Per mode:

1. latency at low load: LOW_RATE calls/s, p50 of INVITE -> final response;
2. a rate ladder: a fixed number of calls per rate (1,500, or 10 s of calls but at
   least 500 at a low rate; --quick 400), from 200 calls/s, doubling until a step
   fails, then bisecting to within 15% (--quick 30%).
   A step is held when every call got its 403 and the p99 of INVITE -> final is
   <= 50 ms; a failed step runs once more (one stall of a shared box must not end the
   ladder; not with --quick). The highest rate held is reported;
3. overload: steps at 1.5x and 2x the highest rate held (--quick: 2x). On every step
   up to 2x, calls that neither the store counted (`fastagi-ctl status ADDR --json`)
   nor Asterisk logged (the seed's NOTICE line naming the step's address) are
   reported as bounds: at least sent - counted - logged, at most
   sent - max(counted, logged) (a call may be both);
4. CPU per call of every process (Asterisk, the FastAGI server, Redis: utime + stime
   from /proc before and after, over the calls sent) at 200 calls/s (--cpu-rate),
   lowered to a rate every mode held;
5. embedded and redis: the same service driven by the project's emulator
   (fastagi.emulator.FakeAsterisk) at that rate: server CPU per call, real vs emulator.

The modes run side by side: five PBX namespaces, one Asterisk each, every phase
interleaved round robin, so drifting load on a shared box hits all of them alike.

The screening threshold is 1,000,000: nothing is banned during the flood. Root needed
(network namespaces); the host's firewall is never touched (dry-run backend). A full
run takes 10-20 minutes, --quick about 5. Everything started is stopped on exit,
Ctrl-C included. Results: WORK/results.json and the Markdown tables on stdout
(progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "lab" / "asterisk"))

import lab  # noqa: E402  (lab/asterisk/lab.py: namespaces, configs, Asterisk)
from tests.netns import NamespaceRedis, make_topology  # noqa: E402

MODES = ("alone", "floor", "trips", "embedded", "redis")
SERVICE_MODES = ("embedded", "redis")
P99_LIMIT_MS = 50.0
FIRST_RATE = 200  # the ladder's first step; the CPU figures' rate unless --cpu-rate
MIN_RATE, MAX_RATE = 50, 3200
LOW_RATE = 20
STEP_SECONDS = 10
AGI_PORT, REDIS_PORT = 4573, 6390
THRESHOLD = 1_000_000
# One attacker address per step: every step's count and NOTICE lines are its own.
# One PBX namespace per mode (192.0.2.21-24): the modes run side by side, interleaved.
HOSTS: dict[str, tuple[int, tuple[int, ...]]] = {
    "attacker": (10, tuple(range(100, 140))),
    **{f"pbx{i}": (20 + i, ()) for i in range(1, 1 + len(MODES))},
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FD_CEILING = 8000  # chan_sip keeps guest dialogs (2 fds each) ~32 s; Asterisk's limit: 20,000
NOTICE_TEXT = "Incoming SIP connection from unknown peer failed for {ip} - Unknown"


@dataclass(frozen=True)
class Plan:
    """How much one run does: --quick shrinks every count, not the criterion."""

    step_calls: int  # calls per step, at most STEP_SECONDS of them at low rates
    min_calls: int  # ... but never fewer than this
    low_calls: int  # calls of the low-load latency step
    resolution: float  # the ladder stops when the failed rate is this close above the held
    overload: tuple[float, ...]  # steps at these multiples of the highest rate held
    again: bool  # a failed ladder step runs once more

    def calls_at(self, rate: int) -> int:
        """A step's calls: step_calls, but no longer than STEP_SECONDS at a low rate
        (a slow mode must not stretch the run; p99 still over >= min_calls)."""
        return min(self.step_calls, max(self.min_calls, rate * STEP_SECONDS))


FULL = Plan(1500, 500, low_calls=100, resolution=0.15, overload=(1.5, 2.0), again=True)
QUICK = Plan(400, 400, low_calls=40, resolution=0.3, overload=(2.0,), again=False)


@dataclass
class Step:
    """One sipp run at one rate: what came back and what each process spent."""

    rate: int
    source: str
    sent: int = 0
    answered: int = 0  # final response 403
    failed: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    counted: int = 0
    logged: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def held(self) -> bool:
        return held(self.sent, self.answered, self.failed, self.p99_ms)

    @property
    def unseen(self) -> tuple[int, int]:
        return unseen_bounds(self.sent, self.counted, self.logged)

    def cpu_per_call_ms(self) -> dict[str, float]:
        return {k: 1000 * v / self.sent for k, v in self.cpu_s.items()} if self.sent else {}


# -- the bench's arithmetic (tests/test_asterisk_flood.py) ------------------------------


def held(sent: int, answered: int, failed: int, p99_ms: float | None) -> bool:
    """The criterion: every call answered, none failed, p99 INVITE -> final <= 50 ms."""
    return (
        sent > 0
        and answered == sent
        and failed == 0
        and p99_ms is not None
        and p99_ms <= P99_LIMIT_MS
    )


def unseen_bounds(sent: int, counted: int, logged: int) -> tuple[int, int]:
    """(at least, at most) calls neither counted nor logged. A call may be both (the
    service logs the NOTICE and counts), so only bounds follow from the two totals."""
    return max(0, sent - counted - logged), max(0, sent - max(counted, logged))


def next_rate(tried: dict[int, bool], resolution: float) -> int | None:
    """The ladder: FIRST_RATE, doubling while steps hold, then bisecting between the
    highest rate held and the lowest failed above it; None when done."""
    if not tried:
        return FIRST_RATE
    best = max((r for r, ok in tried.items() if ok), default=0)
    above = [r for r, ok in tried.items() if not ok and r > best]
    if not above:
        return None if best >= MAX_RATE else min(best * 2, MAX_RATE)
    low_fail = min(above)
    if best == 0:
        rate = low_fail // 2
        return rate if rate >= MIN_RATE else None
    if low_fail - best <= resolution * best:
        return None
    rate = int(round((best + low_fail) / 2, -1))
    return rate if best < rate < low_fail else None


def cpu_rate_for(asked: int, held: list[int]) -> int:
    """The rate of the CPU figures: the one asked, lowered to what every mode held (in
    tens), so no mode is measured saturated; never below MIN_RATE."""
    lowest = min(held, default=asked)
    return max(MIN_RATE, min(asked, lowest // 10 * 10))


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def parse_sipp_stat(text: str) -> dict[str, int]:
    """sipp's -trace_stat file (';'-separated, header first): the last row's totals."""
    rows = [line.rstrip(";\n").split(";") for line in text.splitlines() if line.strip()]
    if len(rows) < 2:
        return {}
    last = dict(zip(rows[0], rows[-1], strict=False))
    out = {}
    for key, name in (
        ("TotalCallCreated", "sent"),
        ("SuccessfulCall(C)", "answered"),
        ("FailedCall(C)", "failed"),
    ):
        with contextlib.suppress(KeyError, ValueError):
            out[name] = int(last[key])
    return out


def parse_sipp_rtt(text: str) -> list[float]:
    """sipp's -trace_rtt file: `date_ms;response_time_ms;rtd_no` per call, in ms."""
    values = []
    for line in text.splitlines():
        parts = line.split(";")
        with contextlib.suppress(ValueError, IndexError):
            values.append(float(parts[1]))
    return values


def count_notices(log_text: str, ip: str) -> int:
    """The seed's NOTICE lines naming `ip` (whoever wrote them: dialplan or service)."""
    needle = NOTICE_TEXT.format(ip=ip)
    return sum(1 for line in log_text.splitlines() if "NOTICE[" in line and needle in line)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return 0.0


# -- one mode on one Asterisk ------------------------------------------------------------

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- A guest INVITE without SDP; the dialplan answers 403 (Hangup(21)). rtd 1: INVITE -> 403 -->
<scenario name="flood guest invite">
  <send retrans="500" start_rtd="1">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: "flood" <sip:scanner@[local_ip]:[local_port]>;tag=[pid]F[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:scanner@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="100" optional="true"></recv>
  <recv response="183" optional="true"></recv>
  <recv response="403" rtd="1"></recv>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: 1 ACK
      Contact: sip:scanner@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""

# The seed recipe (../shared/asterisk/log-notice.txt) with the address function that
# works on each stack and the shipped dialplan's Hangup(21), so every mode answers 403.
SEED = {
    "chan_sip": "Set(foo=${CHANNEL(recvip)})",
    "PJSIP": "Set(foo=${CHANNEL(pjsip,remote_addr)})\n same => n,Set(foo=${CUT(foo,:,1)})",
}


def seed_context(context: str, stack: str) -> str:
    return (
        f"[{context}]\n"
        "exten => _.,1,NoOp(Received incoming SIP connection from unknown peer to ${EXTEN})\n"
        f" same => n,{SEED[stack]}\n"
        " same => n,Log(NOTICE,Incoming SIP connection from unknown peer failed for ${foo}"
        " - Unknown connection from peer)\n"
        " same => n,Hangup(21)\n"
        "exten => h,1,Hangup()\n"
    )


def guest_context(etc: Path, stack: str) -> str:
    """The context lab.write_config sends the stack's guests to: sip.conf's [general]
    context, or that of pjsip.conf's [anonymous] endpoint."""
    name, section = ("sip.conf", "general") if stack == "chan_sip" else ("pjsip.conf", "anonymous")
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string((etc / name).read_text())
    return parser.get(section, "context")


def quiet_config(work: Path, stack: str, mode: str) -> None:
    """lab.write_config's files, trimmed for a flood: verbose 0, one log file with
    NOTICE and worse; the seed recipe instead of the shipped dialplan when `alone`."""
    etc = work / "etc"
    conf = etc / "asterisk.conf"
    conf.write_text(conf.read_text().replace("verbose = 3", "verbose = 0"))
    (etc / "logger.conf").write_text("[general]\n[logfiles]\nmessages => notice,warning,error\n")
    if mode == "alone":
        (etc / "extensions.conf").write_text(
            "[general]\nstatic = yes\nwriteprotect = yes\n\n"
            + seed_context(guest_context(etc, stack), stack)
            + "\n[from-internal]\nexten => _X.,1,Hangup()\n"
        )


# lab.write_service_config's keys changed for a flood: our AGI port, a threshold no caller
# reaches (nothing is banned), the dry-run firewall, no AMI watcher.
FLOOD_CONFIG: dict[str, dict[str, object] | None] = {
    "server": {"listen": f"127.0.0.1:{AGI_PORT}"},
    "screening": {"threshold": THRESHOLD, "window": "1h"},
    "firewall": {"backend": "dry-run", "ports": None, "sync_interval": None},
    "auth": None,
}


class Rig:
    """One mode on its own freshly started Asterisk, in a PBX namespace of its own."""

    def __init__(self, attacker, pbx, inst: Path, stack, mode: str, work: Path) -> None:
        self.inst, self.stack, self.mode, self.work = inst, stack, mode, work
        self.pbx, self.attacker = pbx, attacker
        self.pids: dict[str, int] = {}
        self.config: Path | None = None
        self.scenario = work / "guest.xml"

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.scenario.write_text(SCENARIO)
        stacks = lab.stacks_of(self.inst)
        conf = lab.write_config(self.work, self.inst, stacks)
        quiet_config(self.work, self.stack.name, self.mode)
        log = (self.work / "server.log").open("ab")
        if self.mode in ("floor", "trips"):
            floor = [sys.executable, str(ROOT / "bench/peers/floor_agi.py")]
            trips = ["--trips", "2"] if self.mode == "trips" else []
            proc = self.pbx.spawn([*floor, *trips], stdout=log, stderr=log)
            self.pids["server"] = proc.pid
        elif self.mode in SERVICE_MODES:
            url = "memory://"
            if self.mode == "redis":
                redis = NamespaceRedis(self.pbx, str(self.work), port=REDIS_PORT)
                redis.start()
                assert redis.proc is not None
                self.pids["redis"] = redis.proc.pid
                url = redis.url()  # it listens on the namespace's own address
            self.config = lab.write_service_config(self.work, stacks, url, "flood", FLOOD_CONFIG)
            proc = self.pbx.spawn(
                [sys.executable, "-m", "fastagi.cli", "--config", str(self.config), "serve"],
                stdout=log,
                stderr=log,
                cwd=str(ROOT),
            )
            self.pids["server"] = proc.pid
        if "server" in self.pids:
            self.pbx.wait_tcp("127.0.0.1", AGI_PORT, timeout=20)
        self.asterisk = lab.Asterisk(self.inst, conf, self.pbx, self.work / "asterisk.out")
        self.pids["asterisk"] = int((self.work / "var/run/asterisk.pid").read_text())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.asterisk.stop()
        self.pbx.stop_processes()

    # -- measuring ---------------------------------------------------------------------

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def counted(self, ip: str) -> int:
        if self.config is None:
            return 0
        ctl = [sys.executable, "-m", "fastagi.cli", "--config", str(self.config)]
        out = self.pbx.run(
            [*ctl, "status", ip, "--json"],
            check=False,
            timeout=60,
        )
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(out.stdout)["count"] or 0)
        return 0

    def settle(self, limit: float = 20.0) -> None:
        """Until Asterisk has no channel left (the calls' AGI sessions are over)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            out = self.asterisk.cli("core show channels count", check=False).stdout
            if "0 active channels" in out:
                return
            time.sleep(0.3)

    def wait_fds(self, limit: float = 40.0) -> None:
        """chan_sip holds every guest dialog's sockets for ~32 s: keep clear of the limit."""
        deadline = time.monotonic() + limit
        fd_dir = Path(f"/proc/{self.pids['asterisk']}/fd")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if len(os.listdir(fd_dir)) < FD_CEILING:
                    return
            time.sleep(1)

    def sipp(self, rate: int, calls: int, source: str, tag: str) -> Step:
        out = self.work / "steps" / tag
        out.mkdir(parents=True, exist_ok=True)
        self.wait_fds()
        argv = [
            "sipp",
            f"{self.pbx.ipv4}:{self.stack.port}",
            "-sf",
            str(self.scenario),
            "-i",
            source,
            "-p",
            "5060",
            "-s",
            "7001",
            "-r",
            str(rate),
            "-m",
            str(calls),
            "-l",
            "20000",
            "-recv_timeout",
            "4000",
            "-timeout",
            f"{int(calls / rate) + 30}s",
            "-trace_rtt",
            "-rtt_freq",
            "1",
            "-trace_stat",
            "-fd",
            "1",
            "-nostdin",
        ]
        before = self.cpu()
        subprocess.run(
            self.attacker.argv(argv),
            cwd=out,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(out / "sipp.stderr").open("wb"),
            timeout=calls / rate + 60,
            check=False,
        )
        self.settle()
        after = self.cpu()
        time.sleep(0.5)  # Asterisk's logger writes from its own thread
        step = Step(rate=rate, source=source)
        stats = [parse_sipp_stat(p.read_text()) for p in sorted(out.glob("*_.csv"))]
        for key, value in (stats[-1] if stats else {}).items():
            setattr(step, key, value)
        rtt = [v for p in out.glob("*_rtt.csv") for v in parse_sipp_rtt(p.read_text())]
        step.p50_ms, step.p99_ms = percentile(rtt, 50), percentile(rtt, 99)
        step.cpu_s = {k: after[k] - before[k] for k in after}
        step.counted = self.counted(source)
        messages = self.work / "var/log/messages"
        step.logged = count_notices(messages.read_text(errors="replace"), source)
        return step

    def probe(self, calls: int, source: str) -> list[float | None]:
        """INVITE -> final at low load, timed here to the microsecond (sipp's clock ticks
        in 4 ms here): one guest INVITE at a time (lab.Dialog), LOW_RATE a second; None
        for a call that got no 403."""
        times: list[float | None] = []
        for _ in range(calls):
            started = time.perf_counter()
            dialog = lab.Dialog(self.attacker, source, self.pbx.ipv4, self.stack.port, "udp", 2)
            try:
                sent = time.perf_counter()
                final = dialog.request("INVITE", "7001", 1)
                ok = final is not None and final[0] == 403
                times.append(1000 * (time.perf_counter() - sent) if ok else None)
            except OSError:
                times.append(None)
            finally:
                dialog.close()
            time.sleep(max(0.0, started + 1 / LOW_RATE - time.perf_counter()))
        return times

    def emulate(self, rate: int, calls: int, source: str) -> dict:
        """The same service driven by fastagi.emulator at `rate`: its CPU per call."""
        url = f"agi://127.0.0.1:{AGI_PORT}/screen?key={lab.KEY}"
        channel = "SIP" if self.stack.name == "chan_sip" else "PJSIP"
        before = self.cpu()
        out = self.pbx.run(
            [sys.executable, __file__, "emulate", url, str(rate), str(calls), source, channel],
            check=False,
            timeout=calls / rate + 60,
        )
        after = self.cpu()
        result = json.loads(out.stdout or "{}")
        done = max(1, result.get("ok", 0))
        result["cpu_ms"] = {
            k: 1000 * (after[k] - before[k]) / done for k in after if k != "asterisk"
        }
        result["counted"] = self.counted(source)
        return result


class Ladder:
    """One mode's sipp steps: the ladder to the highest rate held, then overload."""

    def __init__(self, rig: Rig, plan: Plan) -> None:
        self.rig, self.plan = rig, plan
        self.sources = iter(rig.attacker.extra4)
        self.tried: dict[int, bool] = {}
        self.steps: list[Step] = []
        self.best: int | None = None  # set when the ladder is done

    def next(self) -> int | None:
        if self.best is None:
            rate = next_rate(self.tried, self.plan.resolution)
            if rate is not None:
                return rate
            self.best = max((r for r, ok in self.tried.items() if ok), default=0)
        for factor in self.plan.overload:
            rate = int(self.best * factor)
            if self.best and rate not in self.tried and rate <= MAX_RATE:
                return rate
        return None

    def run(self, rate: int) -> None:
        """One rate; a ladder step that fails runs once more (held if either run held):
        on a box shared with other work one stall must not end the ladder."""
        overload = self.best is not None
        for attempt in range(2 if self.plan.again and not overload else 1):
            tag = f"r{rate}" + ("-again" if attempt else "")
            step = self.rig.sipp(rate, self.plan.calls_at(rate), next(self.sources), tag)
            self.steps.append(step)
            self.tried[rate] = step.held
            kind = " (overload)" if overload else " (again)" if attempt else ""
            log(f"  {self.rig.mode} {rate}/s{kind}: {summary(step)}")
            if step.held:
                return

    def result(self) -> dict:
        best = self.best or 0
        upto = [s for s in self.steps if best and s.rate <= 2 * best] or self.steps
        return {
            "held": best,
            "steps": [asdict(s) | {"held": s.held, "unseen": s.unseen} for s in self.steps],
            "unseen": [max(s.unseen[0] for s in upto), max(s.unseen[1] for s in upto)],
            "sent_overload": sum(s.sent for s in upto),
        }


def side_by_side(rigs: list[Rig], plan: Plan, cpu_rate: int) -> dict[str, dict]:
    """Every mode's phases interleaved (round robin), so each sees the same machine:
    latency at low load in slices, one ladder step per mode in turn, then CPU per call
    at one rate and the emulator at that rate."""
    ladders = {r.mode: Ladder(r, plan) for r in rigs}
    latencies: dict[str, list[float | None]] = {r.mode: [] for r in rigs}
    slices = 4
    for _ in range(slices):
        for r in rigs:
            latencies[r.mode] += r.probe(plan.low_calls // slices, next(ladders[r.mode].sources))
    results: dict[str, dict] = {r.mode: {} for r in rigs}
    for r in rigs:
        answered = [t for t in latencies[r.mode] if t is not None]
        results[r.mode]["low"] = {
            "calls": len(latencies[r.mode]),
            "answered": len(answered),
            "p50_ms": percentile(answered, 50),
            "p99_ms": percentile(answered, 99),
        }
        log(f"  {r.mode} low load: {results[r.mode]['low']}")
    while True:
        pending = [(ladder, rate) for ladder in ladders.values() if (rate := ladder.next())]
        if not pending:
            break
        for ladder, rate in pending:
            ladder.run(rate)
    for mode, ladder in ladders.items():
        results[mode].update(ladder.result())
    # CPU per call at one rate every mode held (the asked one, or lower), side by side
    rate = cpu_rate_for(cpu_rate, [ladder.best or 0 for ladder in ladders.values()])
    for r in rigs:
        step = r.sipp(rate, plan.calls_at(rate), next(ladders[r.mode].sources), f"cpu{rate}")
        results[r.mode]["cpu"] = {"rate": rate, "held": step.held, **step.cpu_per_call_ms()}
        log(f"  {r.mode} CPU at {rate}/s: {summary(step)}")
    for r in rigs:
        if r.mode in SERVICE_MODES:
            emulated = r.emulate(rate, plan.calls_at(rate), next(ladders[r.mode].sources))
            results[r.mode]["emulator"] = emulated
            log(f"  {r.mode} emulator at {rate}/s: {emulated}")
    return results


def summary(step: Step) -> str:
    cpu = " ".join(f"{k} {v:.2f}" for k, v in step.cpu_per_call_ms().items())
    return (
        f"sent {step.sent} 403 {step.answered} failed {step.failed} p50 {step.p50_ms} "
        f"p99 {step.p99_ms} ms counted {step.counted} logged {step.logged} "
        f"-> {'held' if step.held else 'NOT held'}; cpu ms/call {cpu}"
    )


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the report ----------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def cpu_of(mode: dict, process: str) -> float | None:
    """CPU ms per call of one process (`all`: their sum) at the run's CPU rate."""
    cpu = {k: v for k, v in mode.get("cpu", {}).items() if k not in ("rate", "held")}
    if process == "all":
        return sum(cpu.values()) if cpu else None
    return cpu.get(process)


def added_latency(mode: dict, alone: dict) -> float | None:
    p50, base = mode.get("low", {}).get("p50_ms"), alone.get("low", {}).get("p50_ms")
    return None if p50 is None or base is None else p50 - base


def verdicts(modes: dict[str, dict]) -> dict[str, dict[str, tuple[str, bool | None]]]:
    """The issue's targets 1-4 and the emulator's agreement, per screening mode:
    target -> (the figures, met / not met / None when the run cannot tell)."""
    alone, floor = modes.get("alone", {}), modes.get("floor", {})
    out: dict[str, dict[str, tuple[str, bool | None]]] = {}
    for name in SERVICE_MODES:
        m = modes.get(name)
        if not m:
            continue
        vs_floor, vs_alone = (
            ratio(m["held"], floor.get("held")),
            ratio(m["held"], alone.get("held")),
        )
        server = ratio(cpu_of(m, "server"), cpu_of(floor, "server"))
        total = ratio(cpu_of(m, "all"), cpu_of(floor, "all"))
        added = added_latency(m, alone)
        low, high = m["unseen"]
        agree = ratio(cpu_of(m, "server"), m.get("emulator", {}).get("cpu_ms", {}).get("server"))
        out[name] = {
            "1 held >= 0.9x floor, >= 0.8x alone": (
                f"{fmt(vs_floor)}x, {fmt(vs_alone)}x",
                None
                if vs_floor is None or vs_alone is None
                else vs_floor >= 0.9 and vs_alone >= 0.8,
            ),
            "2 server CPU <= 3x floor server": (f"{fmt(server, 1)}x", _at_most(server, 3.0)),
            "2 all CPU <= 1.2x floor all": (f"{fmt(total)}x", _at_most(total, 1.2)),
            "3 added p50 <= 1.5 ms": (f"{fmt(added)} ms", _at_most(added, 1.5)),
            "4 unseen = 0 up to 2x held": (
                str(low) if low == high else f"{low}-{high}",
                False if low > 0 else (True if high == 0 else None),
            ),
            "emulator within 25%": (
                f"{fmt(agree)}x",
                None if agree is None else abs(agree - 1) <= 0.25,
            ),
        }
    return out


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def markdown(report: dict) -> str:
    lines = [
        f"{report['date']}, {report['machine']}, {'quick' if report['quick'] else 'full'} run"
        f" ({report['minutes']:.1f} min, load average {' -> '.join(report['loadavg'])})",
        "",
        "| Asterisk, stack | mode | held calls/s | p50 ms at 20/s (added) | CPU ms/call: "
        "Asterisk / server / Redis / all (at calls/s) | server, all vs floor | "
        "unseen up to 2x held | emulator: server ms/call (real/emu) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        modes = run["modes"]
        floor = modes.get("floor", {})
        for name, m in modes.items():
            cpu = " / ".join(fmt(cpu_of(m, k)) for k in ("asterisk", "server", "redis", "all"))
            at = m.get("cpu", {})
            cpu += f" ({at.get('rate')}{'' if at.get('held') else ', not held'})"
            versus = "-"
            if name in (*SERVICE_MODES, "trips"):
                server = ratio(cpu_of(m, "server"), cpu_of(floor, "server"))
                versus = f"{fmt(server, 1)}x, {fmt(ratio(cpu_of(m, 'all'), cpu_of(floor, 'all')))}x"
            added = "" if name == "alone" else f" ({fmt(added_latency(m, modes.get('alone', {})))})"
            emu = m.get("emulator", {}).get("cpu_ms", {}).get("server")
            emulated = "-"
            if emu is not None:
                emulated = f"{fmt(emu)} ({fmt(ratio(cpu_of(m, 'server'), emu))}x)"
            low, high = m.get("unseen", [0, 0])
            lines.append(
                f"| {run['asterisk']} {run['stack']} | {name} | {m.get('held')} | "
                f"{fmt(m.get('low', {}).get('p50_ms'))}{added} | {cpu} | {versus} | "
                f"{low if low == high else f'{low}-{high}'} of {m.get('sent_overload', 0)} | "
                f"{emulated} |"
            )
    names = [t for run in report["runs"] for v in verdicts(run["modes"]).values() for t in v]
    targets = list(dict.fromkeys(names))
    lines += ["", f"| Asterisk, stack | mode | {' | '.join(targets)} |"]
    lines.append("|---|---|" + "---|" * len(targets))
    shown = {True: "met", False: "NOT met", None: "undecided"}
    for run in report["runs"]:
        for name, checks in verdicts(run["modes"]).items():
            cells = [f"{checks[t][0]}: {shown[checks[t][1]]}" for t in targets if t in checks]
            lines.append(f"| {run['asterisk']} {run['stack']} | {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


# -- the emulator side (runs inside the PBX namespace) ---------------------------------------


async def emulate(url: str, rate: float, calls: int, source: str, channel: str) -> dict:
    from fastagi.emulator import Call, FakeAsterisk

    asterisk = FakeAsterisk(hold_limit=20.0)
    results: dict[str, int] = {}
    errors = 0

    async def one() -> None:
        nonlocal errors
        try:
            result = await asterisk.call(url, Call(source=source, channel_type=channel))
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            return
        key = result.variables.get("SCREEN_RESULT", "none")
        results[key] = results.get(key, 0) + 1

    started = time.perf_counter()
    tasks = []
    for i in range(calls):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return {"sent": calls, "ok": sum(results.values()), "errors": errors, "results": results}


def emulate_main(argv: list[str]) -> int:
    url, rate, calls, source, channel = argv
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    print(json.dumps(run(emulate(url, float(rate), int(calls), source, channel))))
    return 0


# -- main ----------------------------------------------------------------------------------


def stacks_to_flood(inst: Path, pjsip_too: bool) -> list:
    stacks = lab.stacks_of(inst)
    if pjsip_too or len(stacks) == 1:
        return stacks
    return [s for s in stacks if s.name == "chan_sip"]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    # The interpreter matters: a Python built without PGO/LTO (pyenv's default) runs
    # the service ~10-20% slower than Debian's python3.
    python = f"Python {platform.python_version()} from {sys.base_prefix}"
    return f"{os.cpu_count()} cores ({model}), shared, {python}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["emulate"]:
        return emulate_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asterisk", action="append", required=True, help="install prefix")
    parser.add_argument("--quick", action="store_true", help="fewer calls per step (~5 min)")
    parser.add_argument("--pjsip-too", action="store_true", help="PJSIP also where chan_sip is")
    parser.add_argument(
        "--cpu-rate",
        type=int,
        default=FIRST_RATE,
        help="calls/s of the CPU figures (lowered to what every mode held)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="a subset, comma-separated")
    parser.add_argument("--work", help="keep configs, logs, sipp files here (default: a temp dir)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("asterisk_flood.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}")
    plan = QUICK if args.quick else FULL
    # SIGTERM as Ctrl-C (also when started with SIGINT ignored, e.g. `&` in a script):
    # the finally blocks stop every Asterisk and server and remove the namespaces
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    started = time.monotonic()
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "quick": args.quick,
        "plan": asdict(plan),
        "loadavg": [Path("/proc/loadavg").read_text().split()[0]],
        "runs": [],
    }
    with lab.workdir(args.work) as work:
        topo = make_topology(HOSTS)
        try:
            for prefix in args.asterisk:
                inst = Path(prefix).resolve()
                version = lab.asterisk_version(inst)
                for stack in stacks_to_flood(inst, args.pjsip_too):
                    run: dict = {"asterisk": version, "stack": stack.name, "modes": {}}
                    report["runs"].append(run)
                    log(f"Asterisk {version} {stack.name}: {', '.join(modes)}")
                    with contextlib.ExitStack() as stop:
                        rigs = []
                        pbxes = [topo[f"pbx{i}"] for i in range(1, 1 + len(modes))]
                        for mode, ns in zip(modes, pbxes, strict=True):
                            where = work / f"{version}-{stack.name}-{mode}"
                            rigs.append(Rig(topo.attacker, ns, inst, stack, mode, where))
                            stop.callback(rigs[-1].stop)
                            rigs[-1].start()
                        run["modes"] = side_by_side(rigs, plan, args.cpu_rate)
        finally:
            topo.close()
            report["minutes"] = (time.monotonic() - started) / 60
            report["loadavg"].append(Path("/proc/loadavg").read_text().split()[0])
            (work / "results.json").write_text(json.dumps(report, indent=1))
            log(f"results in {work / 'results.json'}")
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
