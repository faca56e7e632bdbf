"""Table-driven bad input: every config key with a wrong value, unknown keys and
sections, and bad command lines for every subcommand. Each one: `fastagi-ctl` exits 2
with exactly one line on stderr naming the culprit, no traceback, nothing changed.

Every row is a real `fastagi-ctl` process (run 8 at a time). The store URL points at a
closed port, so a command that wrongly went ahead would exit 1, not 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import struct
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop

from fastagi import cli
from fastagi.config import SCHEMA
from fastagi.emulator import Call, environment_block
from tests.harness import free_port, running_server

# key -> wrong values (TOML literals). Each parser gets a wrong type and, where it has
# a format, a bad value of the right type.
BAD_DURATION = ['"soon"', "-5", "0", '"1y"', "true", '"10 minutes"', "[1]"]
# Numbers TOML reads as floats that no comparison refuses (nan), or that are absurd.
BAD_DURATION += ["nan", "inf", "-inf", "1e300", "-1e300", "1e-9", '"0.0000001s"']
BAD_COUNT = ["nan", "inf", "9223372036854775807", "-9223372036854775808", "1e300"]
BAD_NETS = ["5", '"not-a-cidr"', '["10.0.0.0/33"]', '["192.0.2.0/24", 7]', '["::1/129"]', "{}"]
BAD_VALUES: dict[str, list[str]] = {
    "server.listen": ["5", '"no-port"', '"127.0.0.1:99999"', "[]", '"127.0.0.1:http"'],
    "server.allowed_clients": BAD_NETS,
    "server.max_sessions": ['"many"', "0", "-1", "true", "1.5", "[1]", *BAD_COUNT],
    "server.session_timeout": BAD_DURATION,
    "server.runtime_dir": ["5", "true", '["/tmp"]'],
    "server.key": ['"short"', "5", '"a key with blanks in it"', '"0123456789abcdef,x"'],
    "server.key_file": ['"/nonexistent/key"', "5", '"/etc/passwd"'],
    "server.state_dir": ["5", "true", '"relative/dir"', '["/var/lib/fastagi"]'],
    "screening.threshold": ['"five"', "0", "false", "2.5", *BAD_COUNT],
    "screening.window": BAD_DURATION,
    "screening.ban_time": BAD_DURATION,
    "screening.ban_time_factor": ['"double"', "0.5", "101", "true", "[2]", "nan", "inf", "-inf"],
    "screening.ban_time_max": BAD_DURATION,
    "screening.ignore": BAD_NETS,
    "screening.pbx_id": ["5", "true", '["a"]'],
    "screening.log_notice": ['"maybe"', "5", "[true]"],
    "screening.notice_by": ['"asterisk"', "1", '""'],
    "screening.protect": ["5", '["bad name!"]', '["10.0.0.0/33"]', '["-x.example"]', '[""]'],
    "screening.protect_refresh": BAD_DURATION,
    "screening.ipv4_prefix": ['"wide"', "8", "33", "true", "24.5", '"/24"'],
    "screening.ipv6_prefix": ["16", "129", "false", "64.0", '"/64"', "[64]"],
    "screening.escalate_prefix": ["16", "128", "64", "-1", "true", '"/48"'],
    "screening.escalate_after": ["1", "0", '"four"', "true"],
    "screening.geoip_db": ["5", "true", '["/x.mmdb"]'],
    "screening.deny_countries": ['["CHN"]', "5", '["C1"]', '[""]', '["CN"]'],  # no geoip_db
    "screening.allow_countries": ['["usa"]', "true", '["D"]'],
    "screening.other_countries_threshold": ['"one"', "0", "true", *BAD_COUNT],
    "screening.country_thresholds": ['"US=3"', "{ US = 0 }", "{ USA = 2 }", "5", '{ US = "x" }'],
    "redis.url": [
        '"http://10.0.0.5"',
        "5",
        '"10.0.0.5:6379"',
        "true",
        '"redis://127.0.0.1:notaport/0"',
        '"redis://127.0.0.1:99999/0"',
        '"redis://127.0.0.1:-1/0"',
        '"rediss://[::1/0"',
        '"redis://127.0.0.1:6379/zero"',
        '"redis:///0"',
        '"redis://127.0.0.1:6379/0?db=x"',
        '"redis://user:secret@127.0.0.1:port/0"',
        '"unix://"',
    ],
    "redis.key_prefix": ["5", "true"],
    "redis.timeout": BAD_DURATION,
    "redis.sentinels": ["5", "[5]", '["no-port"]', '["10.0.0.5:"]', '["10.0.0.5:99999"]'],
    "redis.sentinel_service": ["5", "[]"],
    "redis.wait_replicas": ['"all"', "-1", "true", "1.5", *BAD_COUNT],
    "redis.wait_timeout": BAD_DURATION,
    "redis.cluster": ['"maybe"', "5", "[true]"],
    "firewall.backend": ['"ufw"', "5", '["nftables"]'],
    "firewall.chain": ['"bad chain!"', "5", '""', '"' + "C" * 40 + '"'],
    "firewall.ports": ['"5060"', '["5060/sctp"]', '["99999/udp"]', "5", '["x/tcp"]'],
    "firewall.forward": ['"sometimes"', "2"],
    "firewall.sync_interval": BAD_DURATION,
    "metrics.listen": ['"no-port"', "5", '"127.0.0.1:70000"'],
    "metrics.agent_listen": ['"no-port"', "5", '"127.0.0.1:70000"'],
    "metrics.status_page": ['"public"', "true", "5", '""'],
    "auth.enabled": ['"maybe"', "5"],
    "auth.host": ["5", '""', '"a b"', '"user@host"'],
    "auth.port": ['"ami"', "0", "70000", "true"],
    "auth.username": ["5", '"labsec\\r\\nAction: Originate"', '"' + "u" * 300 + '"'],
    "auth.secret": ["5", '"x\\ny"'],
    "auth.secret_file": ["5", "true"],
    "auth.events": ['["ChallengeSent"]', '["SuccessfulAuth"]', '["NoSuchEvent"]', "[]", "5"],
    "auth.threshold": ['"five"', "0", "false", *BAD_COUNT],
    "auth.window": BAD_DURATION,
    "auth.ban_time": BAD_DURATION,
    "intel.feed": [
        "5",
        '"x"',
        "[5]",
        '[{ name = "x" }]',
        '[{ name = "x", url = "ftp://x" }]',
        '[{ name = "a b", file = "/x" }]',
        '[{ name = "x", file = "/x", refresh = "soon" }]',
        '[{ name = "x", file = "/x", format = "csv" }]',
        '[{ name = "x", file = "/x" }, { name = "x", file = "/y" }]',
    ],
}


def test_the_table_covers_every_schema_key():
    assert set(BAD_VALUES) == {f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys}


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTAGI_")}
    env["FASTAGI_RUNTIME_DIR"] = str(tmp / "run")
    env["FASTAGI_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    return env


def _ctl(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """A real `fastagi-ctl` process: (exit code, stderr, stdout)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastagi.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stderr, proc.stdout


def _main(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """`fastagi.cli.main` in this process (the same code, ~100x cheaper than a process):
    (exit code, stderr, stdout). Any exception escaping main is a failure of the row."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli.main(args)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                return -1, "Traceback (in process)\n" + traceback.format_exc(), ""
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, err.getvalue(), out.getvalue()


def _check_all(rows, env: dict[str, str], runner=_main) -> None:
    """rows: (label, argv, text the single stderr line must contain[, env changes])."""
    results = []
    if runner is _ctl:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda row: _ctl(row[1], {**env, **_extra(row)}), rows))
    else:
        results = [_main(row[1], {**env, **_extra(row)}) for row in rows]
    failures = []
    for row, (code, stderr, _) in zip(rows, results, strict=True):
        label, argv, needle = row[:3]
        lines = stderr.splitlines()
        if code != 2 or len(lines) != 1 or needle not in lines[0] or "Traceback" in stderr:
            failures.append(f"{label}: argv={argv} exit={code} stderr={stderr[-600:]!r}")
    assert not failures, f"{len(failures)} of {len(rows)} rows:\n" + "\n".join(failures)
    print(f"\nbad input: {len(rows)} rows, each exit 2 with one stderr line")


def _extra(row) -> dict[str, str]:
    return row[3] if len(row) > 3 else {}


def _key_rows(tmp_path: Path):
    rows = []
    for n, (dotted, values) in enumerate(BAD_VALUES.items()):
        section, key = dotted.split(".")
        for m, value in enumerate(values):
            path = tmp_path / f"bad-{n}-{m}.toml"
            path.write_text(f"[{section}]\n{key} = {value}\n")
            # A bad redis.url must not be hidden by the closed-port override.
            extra = {"FASTAGI_REDIS_URL": ""} if dotted == "redis.url" else {}
            rows.append((f"{dotted} = {value}", ["--config", str(path), "status"], dotted, extra))
    return rows


def test_every_key_with_a_bad_value_in_the_file_exits_2_naming_it(tmp_path):
    env = _env(tmp_path)
    rows = _key_rows(tmp_path)
    _check_all([r[:3] for r in rows if not r[3]], env)
    env_without_url = {k: v for k, v in env.items() if k != "FASTAGI_REDIS_URL"}
    _check_all([r[:3] for r in rows if r[3]], env_without_url)


def test_one_bad_key_per_section_as_real_processes(tmp_path):
    """The in-process rows above, sampled as real `fastagi-ctl` processes."""
    env = {k: v for k, v in _env(tmp_path).items() if k != "FASTAGI_REDIS_URL"}
    seen, rows = set(), []
    for row in _key_rows(tmp_path):
        section = row[2].split(".")[0]
        if section not in seen:
            seen.add(section)
            rows.append(row[:3])
    _check_all(rows, env, runner=_ctl)


def test_every_key_with_a_bad_environment_override_exits_2_naming_the_variable(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if k != "FASTAGI_REDIS_URL"}
    rows = []
    for dotted, values in BAD_VALUES.items():
        section, key = dotted.split(".")
        variable = f"FASTAGI_{section.upper()}_{key.upper()}"
        for value in values[:2]:
            rows.append((f"{variable}={value}", ["status"], variable, {variable: value}))
    _check_all(rows, env)


def test_unknown_sections_keys_and_broken_files_exit_2(tmp_path):
    cases = {
        "[server]\nlisten_port = 4573\n": "server.listen_port",
        '[redis]\nhost = "10.0.0.5"\n': "redis.host",
        "[screenin]\nthreshold = 5\n": "[screenin]",
        "[fail2ban]\nmaxretry = 5\n": "[fail2ban]",
        "threshold = 5\n": "threshold",  # a top-level key: not a section
        "[screening]\nthreshold = \n": "not valid TOML",
        "[screening\nthreshold = 5\n": "not valid TOML",
        "[screening]\nthreshold = 5\nthreshold = 6\n": "not valid TOML",
        '[screening]\nban_time = "1h"\nban_time_max = "10m"\n': "screening.ban_time_max",
        '[redis]\ntimeout = "10s"\n': "redis.timeout",
        '[redis]\ncluster = true\nsentinels = ["127.0.0.1:26379"]\n': "redis.cluster",
        "[redis]\ncluster = true\nwait_replicas = 1\n": "redis.wait_replicas",
    }
    rows = []
    for n, (text, needle) in enumerate(cases.items()):
        path = tmp_path / f"c{n}.toml"
        path.write_text(text)
        rows.append((text.strip(), ["--config", str(path), "status"], needle))
    (tmp_path / "latin1.toml").write_bytes(b'[screening]\npbx_id = "\xe9"\n')
    rows.append(
        ("latin-1 file", ["--config", str(tmp_path / "latin1.toml"), "status"], "latin1.toml")
    )
    rows.append(("missing file", ["--config", str(tmp_path / "nope.toml"), "status"], "nope.toml"))
    rows.append(("a directory", ["--config", str(tmp_path), "status"], str(tmp_path)))
    _check_all(rows, _env(tmp_path))


CLI_ROWS = [
    ([], "required"),
    (["frobnicate"], "frobnicate"),
    (["--bogus", "status"], "--bogus"),
    (["serve", "--listen", "no-port"], "--listen"),
    (["serve", "--listen", "127.0.0.1:99999"], "--listen"),
    (["serve", "--redis", "http://10.0.0.5"], "--redis"),
    (["serve", "--firewall", "ufw"], "--firewall"),
    (["serve", "--bogus"], "--bogus"),
    (["agent", "--firewall", "ufw"], "--firewall"),
    (["agent", "--redis", "memory://"], "memory://"),
    (["agent", "extra"], "extra"),
    (["ban"], "ip"),
    (["ban", "not-an-ip"], "not-an-ip"),
    (["ban", "203.0.113.300"], "203.0.113.300"),
    (["ban", "127.0.0.1"], "ignore"),
    (["ban", "::1"], "ignore"),
    (["ban", "203.0.113.9", "--for", "forever"], "--for"),
    (["ban", "203.0.113.9", "--for", "-5s"], "--for"),
    (["ban", "203.0.113.9/24"], "203.0.113.9/24"),  # host bits set: a typo, not a /24
    (["ban", "0.0.0.0/0"], "0.0.0.0/0"),
    (["ban", "2001:db8::/16"], "2001:db8::/16"),
    (["unban"], "--all"),
    (["unban", "203.0.113.9", "--all"], "--all"),
    (["unban", "203.0.113.9", "bad-ip"], "bad-ip"),
    (["status", "bad-ip"], "bad-ip"),
    (["status", "203.0.113.9", "extra"], "extra"),
    (["status", "--xml"], "--xml"),
    (["check", "now"], "now"),
    (["simulate"], "--ip"),
    (["simulate", "--ip", "bad"], "--ip"),
    (["simulate", "--ip", "203.0.113.9", "--calls", "0"], "--calls"),
    (["simulate", "--ip", "203.0.113.9", "--calls", "x"], "--calls"),
    (["simulate", "--ip", "203.0.113.9", "--calls", "1000001"], "--calls"),
    (["simulate", "--ip", "203.0.113.9", "--target", "http://127.0.0.1/screen"], "--target"),
    (["simulate", "--ip", "203.0.113.9", "--type", "IAX2"], "--type"),
    (["simulate", "--ip", "203.0.113.9", "--target", "agi://[::1/screen"], "--target"),
    (["simulate", "--ip", "203.0.113.9", "--target", "agi://::1]/screen"], "--target"),
    (["simulate", "--ip", "203.0.113.9", "--target", "agi://[::1]:99999/screen"], "--target"),
    (["simulate", "--ip", "203.0.113.9", "--target", "agi://127.0.0.1:x/screen"], "--target"),
    (["simulate", "--ip", "203.0.113.9", "--target", "agi:///screen"], "--target"),
    (["simulate", "--ip", "203.0.113.9", "--target", "agi://[fe80::1%eth0/s"], "--target"),
    (["serve", "--redis", "redis://127.0.0.1:notaport/0"], "--redis"),
    (["agent", "--redis", "redis://[::1:6379/0"], "--redis"),
    (["import"], "source"),
    (["import", "/x", "--name", "a b"], "feed name"),
    (["import", "/x", "--format", "csv"], "--format"),
    (["import", "/x", "--for", "forever"], "forever"),
    (["ban", "fe80::1%"], "fe80::1%"),
    (["ban", "203.0.113.9%eth0"], "203.0.113.9%eth0"),
]


def test_bad_command_lines_exit_2_with_one_line(tmp_path):
    rows = [(" ".join(argv) or "(none)", argv, needle) for argv, needle in CLI_ROWS]
    _check_all(rows, _env(tmp_path))


def test_bad_command_lines_as_real_processes(tmp_path):
    """A sample of the command-line rows as real processes (argparse's own exits)."""
    sample = [CLI_ROWS[i] for i in (0, 1, 3, 12, 14, 19, 26, 29, 32, 33)]
    rows = [(" ".join(argv) or "(none)", argv, needle) for argv, needle in sample]
    _check_all(rows, _env(tmp_path), runner=_ctl)


# What another writer (an older version, a hand edit, a bug) can leave in Redis where
# `status` reads: (label, key method of Keys, field, value). Each: status still shows
# the rest, marks the entry, exits 0 with one warning line on stderr.
BAD_REDIS_ENTRIES = [
    ("agents entry not JSON", "agents", "pbx-bad", b"{not json"),
    ("agents entry a JSON list", "agents", "pbx-bad", b"[1, 2]"),
    ("agents entry a JSON number", "agents", "pbx-bad", b"17"),
    ("agents time a string", "agents", "pbx-bad", b'{"time": "yesterday"}'),
    ("agents time out of range", "agents", "pbx-bad", b'{"time": 1e400}'),
    ("agents applied a bool", "agents", "pbx-bad", b'{"time": 1, "applied": true}'),
    ("agents applied text", "agents", "pbx-bad", b'{"time": 1, "applied": "3"}'),
    ("agents entry not UTF-8", "agents", "pbx-bad", b"\xff\xfe{"),
    ("stats calls not a number", "stats", "calls", b"many"),
    ("stats bans a fraction", "stats", "bans", b"1.5"),
    ("stats injections with a newline", "stats", "injections", b"1\n2"),
    ("stats unbans empty", "stats", "unbans", b""),
    ("ban record count not a number", "record", "bans", b"x"),
]


def test_status_shows_what_it_can_and_marks_each_unreadable_entry(tmp_path, redis_url):
    import redis

    from fastagi.keys import Keys

    keys = Keys("fastagi:")
    client = redis.Redis.from_url(redis_url)
    env = {**_env(tmp_path), "FASTAGI_REDIS_URL": redis_url}
    failures = []
    for label, key, field, value in BAD_REDIS_ENTRIES:
        client.flushall()
        good = b'{"time": 1.0e9, "applied": 4, "backend": "nftables"}'
        client.hset(keys.agents, "pbx-good", good)
        client.hset(keys.stats, mapping={"calls": 7, "bans": 1})
        client.zadd(keys.banned, {"203.0.113.9": 4e12})
        client.hset(keys.record("203.0.113.9"), mapping={"bans": 1, "pbx_id": "pbx-good"})
        where = keys.record("203.0.113.9") if key == "record" else getattr(keys, key)
        client.hset(where, field, value)
        for argv in (["status"], ["status", "--json"]):
            code, stderr, stdout = _main(argv, env)
            lines = stderr.splitlines()
            shown = field if key == "stats" else "pbx-bad" if key == "agents" else "bans"
            if (
                code != 0
                or len(lines) != 1
                or "unreadable" not in lines[0]
                or "Traceback" in stderr
                or "pbx-good" not in stdout  # the rest is still shown
                or "203.0.113.9" not in stdout
                or shown not in stdout.split("nreadable", 1)[-1]  # and the bad one marked
            ):
                failures.append(f"{label} {argv}: exit={code} stderr={stderr!r} out={stdout!r}")
    assert not failures, "\n".join(failures)


def test_a_redis_url_with_a_bad_port_never_shows_its_password(tmp_path):
    env = {**_env(tmp_path), "FASTAGI_REDIS_URL": "redis://u:hunter2@127.0.0.1:port/0"}
    code, stderr, _ = _main(["status"], env)
    assert code == 2 and len(stderr.splitlines()) == 1 and "hunter2" not in stderr


# -- bad input at the FastAGI port: the session goes on, one clear log line ----------

ZONED_CALLERS = [
    ("SIP", "fe80::1%eth0"),
    ("PJSIP", "fe80::1%eth0"),
    ("SIP", "fe80::1%2"),
    ("PJSIP", "fe80::1%veth-pbx.1"),
]


def test_link_local_callers_with_a_zone_are_read_without_it(caplog):
    # link-local (fe80::/10) is protected: never counted, one line for the address
    caplog.set_level(logging.INFO, logger="fastagi")

    async def main():
        async with running_server() as srv:
            results = [
                await srv.call(Call(source=source, channel_type=kind))
                for kind, source in ZONED_CALLERS
            ]
            return results, await srv.store.count("fe80::1")

    results, count = asyncio.run(main())
    assert [r.variables.get("SCREEN_REASON") for r in results] == ["protected"] * 4
    assert count == 0
    lines = [r.getMessage() for r in caplog.records if "not counted: protected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("calls from fe80::1 are")


def test_an_ignore_entry_in_mapped_form_matches_ipv4_callers():
    async def main():
        async with running_server(SCREENING_IGNORE='["::ffff:192.0.2.0/120"]') as srv:
            return [
                (await srv.call(Call(source=source, channel_type=kind))).variables
                for kind, source in (
                    ("SIP", "192.0.2.9"),
                    ("SIP", "::ffff:192.0.2.10"),
                    ("PJSIP", "192.0.2.11"),
                    ("SIP", "192.0.3.9"),
                )
            ]

    results = asyncio.run(main())
    assert [r["SCREEN_RESULT"] for r in results] == ["IGNORED"] * 3 + ["COUNTED"]


def test_a_connection_reset_before_its_session_is_logged_as_such(caplog):
    caplog.set_level(logging.INFO, logger="fastagi")

    async def main():
        async with running_server() as srv:
            port = int(srv.target.split(":")[2].split("/")[0])
            # Connected and reset before the loop gets to accept it: the peer's
            # address is gone by the time the session would start.
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await asyncio.sleep(0.2)
            served = await srv.call(Call(source="192.0.2.80"))
            return served, srv.server.stats

    # On uvloop, as `serve` runs: it asks for the peer's address only when asked, and
    # by then a reset connection has none.
    served, stats = uvloop.run(main())
    assert served.variables["SCREEN_RESULT"] == "COUNTED"  # and the next call is served
    assert stats.reset_early == 1 and stats.refused_client == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "fastagi.server"]
    assert len(lines) == 1 and "reset by the peer before the session" in lines[0], lines
    assert "?" not in lines[0]


def test_the_injection_warning_shows_the_dialed_text_when_the_block_ended_early(caplog):
    caplog.set_level(logging.INFO, logger="fastagi")
    dialed = "559%0Aagi_arg_3%3A%20203.0.113.9%0A%0A"

    async def main():
        async with running_server() as srv:
            return await srv.call(Call.from_uri_user(dialed, source="198.51.100.4"))

    result = asyncio.run(main())
    assert result.variables["SCREEN_RESULT"] == "COUNTED"
    warnings = [r.getMessage() for r in caplog.records if "injection attempt" in r.getMessage()]
    assert len(warnings) == 1 and "dialed '559'" in warnings[0], warnings


def test_refusals_are_logged_as_a_few_summary_lines_and_counted(caplog):
    caplog.set_level(logging.INFO, logger="fastagi")

    async def main():
        async with running_server(SERVER_MAX_SESSIONS="1") as srv:
            srv.server.refusals.SUMMARY_EVERY = 0.3
            port = int(srv.target.split(":")[2].split("/")[0])
            # the one session, past its environment (an idle one would be closed for room)
            _, holder = await asyncio.open_connection("127.0.0.1", port)
            holder.write(b"".join(environment_block(Call(), srv.target, 0)))
            await asyncio.sleep(0.05)
            refused = [await srv.call(Call(source="192.0.2.81")) for _ in range(30)]
            await asyncio.sleep(0.5)  # one summary due
            holder.close()
            return refused, srv.server.stats

    refused, stats = asyncio.run(main())
    assert [r.variables for r in refused] == [
        {"SCREEN_RESULT": "ERROR", "SCREEN_ERROR": "busy"}
    ] * 30
    assert stats.refused_busy == 30
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "max_sessions 1 busy" in lines[0]
    assert lines[1].startswith("refused 29 FastAGI connections more: 29 busy (max_sessions)")
