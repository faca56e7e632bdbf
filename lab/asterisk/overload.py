#!/usr/bin/env python3
"""Nothing unseen under overload, on a real Asterisk (not part of CI).

    sudo .venv/bin/python lab/asterisk/overload.py --asterisk PREFIX/inst [--work DIR]
        [--rate 300] [--calls 3000] [--max-sessions 2] [--stall 2]

sipp floods the shipped dialplan with guest INVITEs from one address at `--rate` calls/s,
against `fastagi-ctl serve` with a small `max_sessions` (refusals) and `log_notice =
false`, so the seed's NOTICE line is logged only for calls the server could not surely
count; with `--stall S` a real redis-server is the store and is paused (SIGSTOP) for S
seconds in the middle of the flood (store timeouts). Every call that reached the dialplan
must be counted by the server or leave the NOTICE line in Asterisk's log:
counted + NOTICE lines >= calls answered. Prints one table per SIP stack; exit 0 when
the rule held for all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="guest INVITE answered 403">
  <send retrans="500"><![CDATA[
INVITE sip:7001@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: "flood" <sip:scanner@[local_ip]>;tag=[call_number]
To: <sip:7001@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:scanner@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: 0

  ]]></send>
  <recv response="100" optional="true"/>
  <recv response="403" rtd="true"/>
  <send><![CDATA[
ACK sip:7001@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
From: "flood" <sip:scanner@[local_ip]>;tag=[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

  ]]></send>
</scenario>
"""


def service_config(
    work: Path, stacks: list[lab.Stack], max_sessions: int, redis: str, notice: str
) -> Path:
    path = lab.write_service_config(work, stacks)
    text = path.read_text()
    text = text.replace("[server]\n", f"[server]\nmax_sessions = {max_sessions}\n", 1)
    text = re.sub(r"threshold = \d+\nwindow", "threshold = 1000000\nwindow", text, count=1)
    text = text.replace('window = "10m"', 'window = "1h"')
    text = text.replace("[screening]\n", f"[screening]\n{notice}\n", 1)
    text = text.replace('url = "memory://"', f'url = "{redis}"')
    text = text.replace("[auth]\nenabled = true", "[auth]\nenabled = false")
    text += '\n[metrics]\nlisten = "127.0.0.1:9574"\n'
    path.write_text(text)
    return path


def quiet(conf: Path) -> Path:
    """No VERBOSE lines: at verbose 3 every call writes ~17 log lines and, past 1,000
    queued, Asterisk's logger discards new messages (NOTICE lines among them)."""
    conf.write_text(conf.read_text().replace("verbose = 3", "verbose = 0"))
    logger = conf.parent / "logger.conf"
    logger.write_text(logger.read_text().replace(",verbose,", ","))
    return conf


def metric(pbx: lab.Namespace, name: str) -> dict[str, float]:
    """`name{labels} value` lines of the service's /metrics, scraped inside the namespace."""
    out = pbx.run(
        [
            sys.executable,
            "-c",
            "import urllib.request,sys;sys.stdout.write("
            "urllib.request.urlopen('http://127.0.0.1:9574/metrics').read().decode())",
        ],
    ).stdout
    found = {}
    for line in out.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            found[key[len(name) :]] = float(value)
    return found


def flood(stack, pbx, attacker, work: Path, src: str, rate: int, calls: int) -> dict[str, float]:
    """sipp from `src`: the calls it made, how many got their 403, and the time from
    INVITE to the 403 (sipp's rtt file: whole milliseconds)."""
    run = work / f"sipp-{stack.name}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    (run / "guest403.xml").write_text(SCENARIO)
    options = (
        f"-sf guest403.xml -i {src} -p 0 -r {rate} -m {calls} -l 2000 -nostdin "
        f"-timeout {calls // rate + 60} -recv_timeout 10000 -trace_stat -stf stats.csv -fd 1 "
        f"-trace_rtt -rtt_freq 1"
    )
    attacker.run(f"cd {run} && sipp {options} {pbx.ipv4}:{stack.port}", check=False)
    rows = [line.split(";") for line in (run / "stats.csv").read_text().splitlines()]
    last = dict(zip(rows[0], rows[-1], strict=False))
    rtts = sorted(
        float(line.split(";")[1])
        for path in run.glob("*_rtt.csv")
        for line in path.read_text().splitlines()[1:]
        if line.count(";") >= 2
    )
    return {
        "made": int(last["TotalCallCreated"]),
        "answered": int(last["SuccessfulCall(C)"]),
        "failed": int(last["FailedCall(C)"]),
        "p50_ms": rtts[len(rtts) // 2] if rtts else float("nan"),
        "mean_ms": sum(rtts) / len(rtts) if rtts else float("nan"),
    }


def notices(work: Path, src: str) -> int:
    time.sleep(2)  # Asterisk's logger writes asynchronously
    text = (work / "var" / "log" / "messages").read_text(errors="replace")
    return text.count(f"failed for {src} - Unknown connection from peer\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asterisk", required=True)
    parser.add_argument("--work")
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--max-sessions", type=int, default=2)
    parser.add_argument("--stall", type=float, default=0.0, help="pause redis-server S seconds")
    parser.add_argument("--notice-by", default="dialplan", choices=("dialplan", "agi"))
    parser.add_argument("--log-notice", action="store_true", help="log_notice = true")
    args = parser.parse_args()
    inst = Path(args.asterisk).resolve()
    version = lab.asterisk_version(inst)
    ok = True
    with lab.workdir(args.work) as work:
        topo = lab.make_topology(lab.HOSTS)
        try:
            pbx, attacker = topo.pbx1, topo.attacker
            stacks = lab.stacks_of(inst)
            asterisk = lab.Asterisk(
                inst, quiet(lab.write_config(work, inst, stacks)), pbx, work / "asterisk.out"
            )
            redis_url, redis = "memory://", None
            if args.stall:
                redis = pbx.spawn(
                    [
                        "redis-server",
                        "--port",
                        "6390",
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ]
                )
                redis_url = "redis://127.0.0.1:6390/0"
                time.sleep(0.5)
            notice = f'log_notice = {str(args.log_notice).lower()}\nnotice_by = "{args.notice_by}"'
            config = service_config(work, stacks, args.max_sessions, redis_url, notice)
            # fastagi-ctl inside the namespace: a real Redis there is not reachable from the host
            lab.ctl = lambda config, *more: pbx.run(
                f"cd {lab.ROOT} && {sys.executable} -m fastagi.cli --config {config} "
                + " ".join(more),
                check=False,
            )
            with (work / "fastagi-serve.log").open("ab") as log:
                pbx.spawn(
                    [
                        sys.executable,
                        "-m",
                        "fastagi.cli",
                        "--config",
                        str(config),
                        "serve",
                        "--no-agent",
                    ],
                    stdout=log,
                    stderr=log,
                    cwd=str(lab.ROOT),
                )
            deadline = time.monotonic() + 20
            while lab.ctl(config, "status").returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError("fastagi-ctl serve did not start")
                time.sleep(0.2)
            for stack, src in zip(stacks, attacker.extra4, strict=False):
                if redis is not None:
                    half = args.calls / args.rate / 2
                    threading.Timer(half, os.kill, (redis.pid, signal.SIGSTOP)).start()
                    threading.Timer(half + args.stall, os.kill, (redis.pid, signal.SIGCONT)).start()
                before = lab.counted(config).get(src, 0)
                calls = flood(stack, pbx, attacker, work, src, args.rate, args.calls)
                time.sleep(max(args.stall, 1))
                count = lab.counted(config).get(src, 0) - before
                logged = notices(work, src)
                refused = metric(pbx, "fastagi_sessions_refused_total")
                errors = metric(pbx, "fastagi_redis_errors_total")
                spent = metric(pbx, "fastagi_session_duration_seconds_")
                total = sum(v for k, v in spent.items() if k.startswith("sum"))
                session_ms = (
                    1000 * total / max(1, sum(v for k, v in spent.items() if k.startswith("count")))
                )
                held = count + logged >= calls["answered"] or args.log_notice
                ok = ok and held
                dropped = (
                    (work / "var" / "log" / "full")
                    .read_text(errors="replace")
                    .count("Log queue threshold")
                )
                print(
                    f"Asterisk {version} {stack.name}: {args.rate} calls/s, {calls['made']} made, "
                    f"{calls['answered']} answered 403 (INVITE->403 p50 {calls['p50_ms']:.0f} ms, "
                    f"mean {calls['mean_ms']:.2f} ms; FastAGI session mean {session_ms:.2f} ms), "
                    f"{calls['failed']} failed; {notice.replace(chr(10), ', ')}; counted "
                    f"{count}, NOTICE lines {logged}; "
                    f"refused {refused}; store errors {errors}; logger drops {dropped}; "
                    f"counted + logged >= answered: {'yes' if held else 'NO'}",
                    flush=True,
                )
        finally:
            with contextlib.suppress(Exception):
                asterisk.stop()
            topo.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
