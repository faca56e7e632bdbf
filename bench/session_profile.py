"""Where one screened session's CPU goes in the service, embedded store or real Redis.

    python bench/session_profile.py [--store memory|redis|both] [--concurrency 10]
        [--duration 5] [--py-spy DIR | --cprofile DIR | --callgrind DIR --sessions 300]

Starts `fastagi-ctl serve --no-agent` (memory://, or a throw-away redis-server on a
free loopback port), pinned with Redis to core 0, and plays Asterisk against it from
core 1 with bench/agi_load.py (FakeAsterisk's wire behaviour: the env block one write
per line, no TCP_NODELAY). Reports the service's CPU per session (utime + stime from
/proc, so noise from other processes on the machine shows up only as wall time). With
`--py-spy DIR` it also samples the service (py-spy, `--native` off) and prints the
functions with the largest inclusive and own share of the samples; `--cprofile DIR`
runs the service under cProfile (its event-loop thread; slower, but every call
counted) and prints the top of its table by cumulative and own time; with `--callgrind
DIR` the service runs under valgrind's callgrind for `--sessions` sequential sessions
and the instructions per session are reported (counted from zero after start-up, so
they exclude it): slow, but the same count on a busy machine as on an idle one.

Everything listens on 127.0.0.1 only; every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import GENERATOR_CORE, SERVER_CORE, Processes, free_port, pinned, start_redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def start_service(
    procs: Processes, store: str, redis_url: str, prefix: list[str], server_path: str = ""
) -> tuple:
    port = free_port()
    env = {
        "FASTAGI_REDIS_URL": redis_url if store == "redis" else "memory://",
        "FASTAGI_SERVER_LISTEN": f"127.0.0.1:{port}",
        "FASTAGI_SERVER_MAX_SESSIONS": "4096",
        "FASTAGI_SERVER_SESSION_TIMEOUT": "60s" if prefix else "3s",
        "FASTAGI_RUNTIME_DIR": str(procs.workdir / f"run-{store}"),
        "FASTAGI_SERVER_STATE_DIR": str(procs.workdir / f"state-{store}"),
        "FASTAGI_SCREENING_PBX_ID": "bench",
        "FASTAGI_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    if server_path:  # another checkout's service (A/B), the same generator
        env["PYTHONPATH"] = server_path
    ctl = shutil.which("fastagi-ctl")
    if ctl:
        argv = [ctl]
    elif prefix[:1] == [sys.executable]:  # under cProfile, which takes `-m module` itself
        argv = ["-m", "fastagi.cli"]
    else:
        argv = [sys.executable, "-m", "fastagi.cli"]
    argv = [*prefix, *argv, "serve", "--no-agent"]
    pid = procs.start(f"ours-{store}", pinned(SERVER_CORE, *argv), port, env, 300)
    return f"agi://127.0.0.1:{port}/screen", pid


def load(url: str, pid: int, *options: str) -> dict:
    argv = [sys.executable, str(HERE / "agi_load.py"), "--json", "--target", f"ours={url}"]
    argv += ["--pid", f"ours={pid}", *options]
    proc = subprocess.run(
        pinned(GENERATOR_CORE, *argv), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)["targets"]["ours"]


def _frame(text: str) -> str:
    """py-spy's `function (path/file.py:line)` as `function file.py:line`."""
    return text.split(" (")[0] + " " + text.rsplit("/", 1)[-1].rstrip(")")


def top_functions(collapsed: Path, count: int = 25) -> list[str]:
    """py-spy's collapsed stacks -> the functions with the largest inclusive share."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        n = int(samples)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    out = [f"{total} samples; inclusive %, own %, function (file:line)"]
    for frame, n in inclusive.most_common(count):
        out.append(f"{100 * n / total:5.1f} {100 * own[frame] / total:5.1f}  {frame}")
    out.append("largest own share:")
    for frame, n in own.most_common(count // 2):
        out.append(f"{100 * inclusive[frame] / total:5.1f} {100 * n / total:5.1f}  {frame}")
    return out


def profile(store: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    procs = Processes(workdir)
    report = []
    try:
        redis_url, redis_pid = start_redis(procs, "redis", workdir) if store == "redis" else ("", 0)
        prefix: list[str] = []
        if args.callgrind:
            out = Path(args.callgrind).resolve() / f"callgrind.{store}.out"
            prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        if args.cprofile:
            stats = Path(args.cprofile).resolve() / f"cprofile.{store}.pstats"
            prefix = [sys.executable, "-m", "cProfile", "-o", str(stats)]
        url, pid = start_service(procs, store, redis_url, prefix, args.server_path)
        common = ["--concurrency", str(args.concurrency), "--repeats", "1"]
        if redis_pid:
            common += ["--pid", f"redis={redis_pid}"]
        load(url, pid, *common, "--duration", "1")  # warm up: scripts loaded, pools filled
        if args.callgrind:
            subprocess.run(["callgrind_control", "--zero", str(pid)], check=True, timeout=120)
            r = load(url, pid, *common, "--duration", "120", "--max-sessions", str(args.sessions))
            subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, timeout=300)
            time.sleep(1)
            dumps = sorted(out.parent.glob(out.name + "*"), key=os.path.getmtime)
            totals = subprocess.run(
                ["callgrind_annotate", str(dumps[-1])], capture_output=True, text=True
            ).stdout
            ir = next(
                int(line.split()[0].replace(",", ""))
                for line in totals.splitlines()
                if "PROGRAM TOTALS" in line
            )
            report.append(
                f"{store}: {r['sessions']} sessions, {ir / r['sessions'] / 1e6:.2f} M "
                f"instructions per session (callgrind, {dumps[-1].name})"
            )
            return report
        spy = None
        if args.py_spy:
            raw = Path(args.py_spy).resolve() / f"py-spy.{store}.txt"
            argv = ["py-spy", "record", "--pid", str(pid), "--rate", "500", "--format", "raw"]
            spy = subprocess.Popen(
                [*argv, "--output", str(raw), "--duration", str(int(args.duration) + 1)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        r = load(url, pid, *common, "--duration", str(args.duration))
        report.append(
            f"{store}: C={args.concurrency} {r['rate']:.0f} sessions/s, service CPU "
            f"{r['cpu_us']:.0f} us/session, redis {r.get('redis_cpu_us', 0):.0f} us, "
            f"p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} ms, {r['results']}"
        )
        if spy is not None:
            spy.wait(timeout=60)
            report += top_functions(raw)
    finally:
        procs.stop_all()
    if args.cprofile:
        report += cprofile_table(stats, r["sessions"])
    return report


def cprofile_table(path: Path, sessions: int, count: int = 30) -> list[str]:
    """cProfile's table, its times per session (warm-up and start-up included)."""
    import io
    import pstats

    text = io.StringIO()
    table = pstats.Stats(str(path), stream=text)
    table.strip_dirs().sort_stats("cumulative").print_stats(count)
    table.sort_stats("tottime").print_stats(count)
    return [f"cProfile of {path.name}, {sessions} measured sessions:", text.getvalue()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("memory", "redis", "both"), default="both")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--py-spy", metavar="DIR", help="sample the service with py-spy")
    parser.add_argument("--cprofile", metavar="DIR", help="run the service under cProfile")
    parser.add_argument("--callgrind", metavar="DIR", help="count instructions (valgrind)")
    parser.add_argument("--sessions", type=int, default=300, help="with --callgrind")
    parser.add_argument(
        "--server-path", default="", help="run the service from this checkout (PYTHONPATH)"
    )
    args = parser.parse_args()
    if args.duration > 120 or args.sessions > 20_000:
        parser.error("--duration at most 120 s, --sessions at most 20,000")
    stores = ("memory", "redis") if args.store == "both" else (args.store,)
    for folder in (args.py_spy, args.cprofile, args.callgrind):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)  # the profilers' outputs go there
    workdir = Path(tempfile.mkdtemp(prefix="fastagi-profile-"))
    try:
        for store in stores:
            print("\n".join(profile(store, args, workdir)), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
