"""The shipped fail2ban filters, run through the REAL fail2ban-regex program.

Data: tests/data/fail2ban/captured.tsv holds every distinct log line of the Asterisk 20.20.1 lab
captures (verbatim); derived.tsv holds res_pjsip formats, IPv6/dateformat variants and crafted
forgery attempts.  Each row states the address each filter must yield ("-" = no match).  Every line
is also checked in the syslog / journal / plain-formatter forms (FINDINGS.md section 7) and, for
the matching lines, as an IPv6 variant.  203.0.113.9 (the attacker's forged address) must never
come out of any filter in any form.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
FILTER_DIR = ROOT / "deploy" / "fail2ban" / "filter.d"
DATA_DIR = Path(__file__).resolve().parent / "data" / "fail2ban"
FORGED_ADDRESS = "203.0.113.9"

FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
pytestmark = pytest.mark.skipif(
    FAIL2BAN_REGEX is None,
    reason="fail2ban-regex not installed (apt-get install fail2ban)",
)

FILTERS = {"asterisk-fastagi": 0, "fastagi-notice": 1}  # filter name -> expectation column


class Row:
    def __init__(self, expect: tuple[str, str], source: str, line: str):
        self.expect = expect
        self.source = source
        self.line = line


def _load(name: str) -> list[Row]:
    rows = []
    for raw in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
        if not raw or raw.startswith("#"):
            continue
        exp_ast, exp_notice, source, line = raw.split("\t", 3)
        rows.append(Row((exp_ast, exp_notice), source, line))
    return rows


ROWS = _load("captured.tsv") + _load("derived.tsv")

# ---------------------------------------------------------------------------------------------
# Line forms.  Source-line numbers and function names in the syslog/plain forms are illustrative
# (the regexes accept any); the shape follows Asterisk's logger.c and FINDINGS.md section 7:
#   syslog: "<133>Nov 24 22:02:22 asterisk[28477]: NOTICE[1646][C-00000057]: Ext. 4:3 in @ ctx: msg"
#   plain:  "[Nov 24 22:02:22] NOTICE[1646][C-00000057]: chan_sip.c:25020 handle_request_invite: m"
# ---------------------------------------------------------------------------------------------
_LINE = re.compile(
    r"^\[(?P<date>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)\] (?P<level>[A-Z]+)\[(?P<tid>\d+)\]"
    r"(?P<cid>\[C-[\da-f]{8}\])? (?P<file>.+?): (?P<msg>.*)$"
)
_PRI = {"ERROR": 131, "WARNING": 132, "NOTICE": 133, "SECURITY": 133, "VERBOSE": 134}
_FUNC = {
    "chan_sip.c": ("25020", "handle_request_register"),
    "res_security_log.c": ("126", "security_event_stasis_cb"),
    "res_pjsip/pjsip_distributor.c": ("676", "log_failed_request"),
    "res_pjsip_session.c": ("3859", "new_invite"),
    "acl.c": ("1032", "ast_apply_acl_internal"),
    "res_pjsip_registrar.c": ("1262", "register_aor"),
    "pjproject": ("0", "<?>"),  # res_pjproject's log forwarder: no line, function "<?>"
}


def _src(file: str, plain: bool) -> str:
    if file.startswith("Ext. "):  # dialplan Log(): "Ext. <exten>:<priority> in @ <context>"
        return f"{file}:3 {'' if plain else 'in '}@ from-sip-external"
    line, func = _FUNC.get(file, ("100", "some_function"))
    return f"{file}:{line} {'' if plain else 'in '}{func}"


def to_form(line: str, form: str) -> str:
    """Render a default-formatter line in another logger/transport form (others stay verbatim)."""
    m = _LINE.match(line)
    if form == "default" or m is None or m["level"] not in _PRI:
        return line
    head = f"{m['level']}[{m['tid']}]{m['cid'] or ''}:"
    if form == "plain":
        return f"[{m['date']}] {head} {_src(m['file'], True)}: {m['msg']}"
    body = f"{head} {_src(m['file'], False)}: {m['msg']}"
    if form == "syslog-raw":  # the datagram Asterisk sends (logger.conf syslog.local0)
        return f"<{_PRI[m['level']]}>{m['date']} asterisk[28477]: {body}"
    if form == "syslog-file":  # as rsyslog writes it to a file
        return f"{m['date']} pbx1 asterisk[28477]: {body}"
    if form == "journal":  # as fail2ban's systemd backend builds it (date kept apart)
        return f"pbx1 asterisk[28477]: {body}"
    raise ValueError(form)


FORMS = ["default", "plain", "syslog-raw", "syslog-file", "journal"]


# ---------------------------------------------------------------------------------------------
# IPv6 variants of the lines that match (address written the way Asterisk prints IPv6)
# ---------------------------------------------------------------------------------------------
def _v6(ip4: str) -> str:
    return "2001:db8::" + ip4.rsplit(".", 1)[1]


def to_ipv6(row: Row) -> Row | None:
    ips = {e for e in row.expect if e != "-"}
    if len(ips) != 1 or not re.fullmatch(r"127\.0\.0\.\d+", next(iter(ips))):
        return None
    ip = next(iter(ips))
    v6 = _v6(ip)
    line = row.line
    q = re.escape(ip)
    line = re.sub(rf"failed for '{q}:(\d+)'", rf"failed for '[{v6}]:\1'", line)
    line = re.sub(rf"\({q}:(\d+)\)", rf"([{v6}]:\1)", line)
    line = re.sub(rf'RemoteAddress="IPV4/(\w+)/{q}/', rf'RemoteAddress="IPV6/\1/{v6}/', line)
    line = line.replace('LocalAddress="IPV4/UDP/127.0.0.1/', 'LocalAddress="IPV6/UDP/2001:db8::1/')
    tail = " - Unknown connection from peer"
    line = re.sub(rf"failed for {q}{tail}$", f"failed for {v6}{tail}", line)
    if re.search(rf"failed for '{q}:|\({q}:|RemoteAddress=\"IPV4/\w+/{q}/|failed for {q} - ", line):
        return None  # an address position the rewrite did not cover
    expect = tuple(v6 if e == ip else e for e in row.expect)
    return Row(expect, row.source + ":ipv6", line)


IPV6_ROWS = [r for r in (to_ipv6(row) for row in ROWS) if r is not None]


# ---------------------------------------------------------------------------------------------
# fail2ban-regex runner: one run per (filter, line set); returns {line: address}
# ---------------------------------------------------------------------------------------------
@functools.cache
def run_filter(filter_spec: str, lines: tuple[str, ...], tmp: Path) -> dict[str, str]:
    """Lines may hold CR bytes (Asterisk writes them): only LF separates lines, in and out."""
    log = tmp / f"in-{abs(hash((filter_spec, lines)))}.log"
    log.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    proc = subprocess.run(
        [FAIL2BAN_REGEX, "--usedns=no", "-l", "error", "-o", "<ip>\t<msg>", str(log), filter_spec],
        capture_output=True,
        timeout=60,
    )
    stdout = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, (
        f"fail2ban-regex failed ({proc.returncode}): {proc.stderr!r}{stdout[-2000:]}"
    )
    found: dict[str, str] = {}
    for out in stdout.split("\n")[:-1]:
        ip, _, msg = out.partition("\t")
        assert msg in lines, f"unexpected fail2ban-regex output line: {out!r}"
        assert found.get(msg, ip) == ip
        found[msg] = ip
    return found


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("f2b")


def _filter_path(name: str) -> str:
    path = FILTER_DIR / f"{name}.conf"
    assert path.is_file(), path
    return str(path)


def _check(name: str, rows: list[Row], form: str, tmp: Path, filter_spec: str | None = None):
    col = FILTERS[name]
    rendered = [(row, to_form(row.line, form)) for row in rows]
    lines = tuple(dict.fromkeys(line for _, line in rendered))
    found = run_filter(filter_spec or _filter_path(name), lines, tmp)
    assert FORGED_ADDRESS not in found.values(), [
        m for m, a in found.items() if a == FORGED_ADDRESS
    ]
    bad = []
    for row, line in rendered:
        got = found.get(line, "-")
        if got != row.expect[col]:
            bad.append(f"expected {row.expect[col]!r}, got {got!r} [{row.source}] {line}")
    assert not bad, f"{len(bad)} wrong result(s) for {name} ({form}):\n" + "\n".join(bad)
    return found


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_data_covers_the_required_cases():
    ast = {r.expect[0] for r in ROWS if r.source.startswith("log-")} - {"-"}
    assert {"127.0.0.8", "127.0.0.9", "127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.16"} <= ast
    lines = "\n".join(r.line for r in ROWS)
    for needle in (
        "- Wrong password",
        "- No matching peer found",
        "- Username/auth name mismatch",
        "- Device does not match ACL",
        "- Peer is not supposed to register",
        "rejected because extension not found",
        'SecurityEvent="InvalidAccountID"',
        'SecurityEvent="ChallengeResponseFailed"',
        'SecurityEvent="InvalidPassword"',
        'SecurityEvent="FailedACL"',
        'SecurityEvent="ChallengeSent"',
        'SecurityEvent="SuccessfulAuth"',
        "- No matching endpoint found",
        "- Failed to authenticate",
        "- Not match Endpoint ACL",
        "- Not match Endpoint Contact ACL",
        "NOTICE[1] x: failed for '203.0.113.9:5060' - Wrong password: Incoming SIP connection",
    ):
        assert needle in lines, needle
    assert len(IPV6_ROWS) >= 40


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(FILTERS))
def test_filter_on_all_lines(name, form, tmp):
    _check(name, ROWS, form, tmp)


@pytest.mark.parametrize("form", ["default", "syslog-raw", "journal"])
@pytest.mark.parametrize("name", sorted(FILTERS))
def test_filter_on_ipv6_variants(name, form, tmp):
    found = _check(name, IPV6_ROWS, form, tmp)
    assert any(":" in ip for ip in found.values())


def test_forged_exten_line_never_yields_the_forged_address(tmp):
    """attacker-controlled-exten.txt section 1: one INVITE writes this physical line."""
    forged = [
        r for r in ROWS if r.source == "attacker-controlled-exten.txt" and FORGED_ADDRESS in r.line
    ]
    assert forged
    lines = tuple(dict.fromkeys(to_form(r.line, form) for r in forged for form in FORMS))
    for name in FILTERS:
        found = run_filter(_filter_path(name), lines, tmp)
        assert FORGED_ADDRESS not in found.values()
        assert set(found.values()) <= {"127.0.0.17", "127.0.0.16"}


def test_mode_security_and_logs_split_the_sources(tmp):
    base = _filter_path("asterisk-fastagi")
    security = [r for r in ROWS if "res_security_log.c" in r.line]
    others = [r for r in ROWS if "res_security_log.c" not in r.line]
    # mode=security: SECURITY events exactly as in mode=all, nothing else
    _check("asterisk-fastagi", security, "default", tmp, f"{base}[mode=security]")
    found = run_filter(f"{base}[mode=security]", tuple(r.line for r in others), tmp)
    assert found == {}
    # mode=logs: NOTICE lines exactly as in mode=all, no SECURITY event
    _check("asterisk-fastagi", others, "default", tmp, f"{base}[mode=logs]")
    found = run_filter(f"{base}[mode=logs]", tuple(r.line for r in security), tmp)
    assert found == {}


# ---------------------------------------------------------------------------------------------
# jail + action: the shipped files load in a real fail2ban configuration, and the action, run by
# fail2ban's own CommandAction, calls fastagi-ctl exactly as documented (a stand-in fastagi-ctl
# records its arguments and exits with a chosen code).
# ---------------------------------------------------------------------------------------------
FAIL2BAN_CLIENT = shutil.which("fail2ban-client")
F2B_PYTHON = Path("/usr/bin/python3")  # Debian's fail2ban interpreter (fail2ban-regex shebang)
if FAIL2BAN_REGEX:
    _shebang = Path(FAIL2BAN_REGEX).read_text(errors="replace").splitlines()[0]
    if _shebang.startswith("#!") and " " not in _shebang[2:].strip():
        F2B_PYTHON = Path(_shebang[2:].strip())


def _f2b_importable() -> bool:
    if not F2B_PYTHON.exists():
        return False
    cmd = [str(F2B_PYTHON), "-c", "import fail2ban.server.action"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.skipif(FAIL2BAN_CLIENT is None, reason="fail2ban-client not installed")
def test_jail_file_loads_in_fail2ban(tmp_path):
    etc = Path("/etc/fail2ban")
    if not (etc / "fail2ban.conf").is_file() or not (etc / "jail.conf").is_file():
        pytest.skip("no stock /etc/fail2ban configuration to build on")
    conf = tmp_path / "fail2ban"
    shutil.copytree(etc, conf, symlinks=True)
    for old in (conf / "jail.d").iterdir():
        old.unlink()
    for kind in ("filter.d", "action.d", "jail.d"):
        for src in (ROOT / "deploy" / "fail2ban" / kind).glob("*.conf"):
            shutil.copy(src, conf / kind / src.name)
    logs = {name: tmp_path / name for name in ("security", "messages")}
    for log in logs.values():
        log.touch()
    (conf / "jail.d" / "zz-test.local").write_text(
        "[asterisk-fastagi]\nenabled = true\nlogpath = {security}\n"
        "[asterisk-fastagi-messages]\nenabled = true\nlogpath = {messages}\n"
        "[asterisk22-fastagi]\nenabled = true\nlogpath = {security}\n"
        "[asterisk22-fastagi-messages]\nenabled = true\nlogpath = {messages}\n"
        "[fastagi-notice]\nenabled = true\nlogpath = {messages}\n".format(**logs)
    )
    test = subprocess.run(
        [FAIL2BAN_CLIENT, "-c", str(conf), "-t"], capture_output=True, text=True, timeout=60
    )
    assert test.returncode == 0, test.stdout + test.stderr
    dump = subprocess.run(
        [FAIL2BAN_CLIENT, "-c", str(conf), "-d"], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    for jail in (
        "asterisk-fastagi",
        "asterisk-fastagi-messages",
        "asterisk22-fastagi",
        "asterisk22-fastagi-messages",
        "fastagi-notice",
    ):
        assert f"['set', '{jail}', 'addaction', 'fastagi']" in dump.stdout
        assert f"--reason \\'f2b-{jail}\\'" in dump.stdout
    # drops=yes reaches the Asterisk 22 messages jail only
    drops = {line.split("'")[3] for line in dump.stdout.splitlines() if "Dropping" in line}
    assert drops == {"asterisk22-fastagi-messages"}


_ACTION_DRIVER = r"""
import json, sys
from fail2ban.client.actionreader import ActionReader
from fail2ban.server.action import CommandAction
from fail2ban.server.actions import Actions
from fail2ban.server.ticket import BanTicket

basedir, opts, ops = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
reader = ActionReader("fastagi", "asterisk", opts, share_config={}, basedir=basedir)
assert reader.read(), "cannot read action.d/fastagi.conf"
reader.getOptions({})


class Jail:
    name = "asterisk"


jail = Jail()
act = CommandAction(jail, "fastagi")
for cmd in reader.convert():
    if cmd[0] == "set" and cmd[2] == "action":
        setattr(act, cmd[4], cmd[5])
    elif cmd[0] == "multi-set" and cmd[2] == "action":
        for key, value in cmd[4]:
            setattr(act, key, value)
for op, ip, bantime in ops:
    ticket = BanTicket(ip, 1700000000)
    ticket.setBanTime(bantime)
    info = Actions.ActionInfo(ticket, jail)
    try:
        act.ban(info) if op == "ban" else act.unban(info)
        print("OK", op, ip)
    except RuntimeError:
        print("FAILED", op, ip)
"""


@pytest.mark.skipif(
    not _f2b_importable(), reason=f"fail2ban's Python modules not importable by {F2B_PYTHON}"
)
@pytest.mark.parametrize(
    ("opts", "ops", "rc", "calls", "results"),
    [
        (
            {"fastagi_config": "/etc/fastagi/fastagi.toml"},
            [["ban", "192.0.2.7", 600], ["unban", "192.0.2.7", 600]],
            0,
            [
                "--config /etc/fastagi/fastagi.toml ban 192.0.2.7 --for 600s --reason f2b-asterisk"
                " --hold f2b-asterisk@HOST",
                "--config /etc/fastagi/fastagi.toml unban 192.0.2.7 --hold f2b-asterisk@HOST",
            ],
            ["OK ban 192.0.2.7", "OK unban 192.0.2.7"],
        ),
        (
            {},
            [["ban", "2001:db8::5", 3600]],
            0,
            ["ban 2001:db8::5 --for 3600s --reason f2b-asterisk --hold f2b-asterisk@HOST"],
            ["OK ban 2001:db8::5"],
        ),
        (  # permanent fail2ban ban: fastagi's own ban_time applies
            {},
            [["ban", "192.0.2.8", -1]],
            0,
            ["ban 192.0.2.8 --reason f2b-asterisk --hold f2b-asterisk@HOST"],
            ["OK ban 192.0.2.8"],
        ),
        (  # exit 2 (refused: ignored address): done, not an error that fail2ban retries
            {},
            [["ban", "127.0.0.1", 600]],
            2,
            ["ban 127.0.0.1 --for 600s --reason f2b-asterisk --hold f2b-asterisk@HOST"],
            ["OK ban 127.0.0.1"],
        ),
        (  # exit 1 (Redis unreachable): reported to fail2ban as a failed ban (it may retry)
            {},
            [["ban", "192.0.2.9", 600]],
            1,
            ["ban 192.0.2.9 --for 600s --reason f2b-asterisk --hold f2b-asterisk@HOST"],
            ["FAILED ban 192.0.2.9"],
        ),
        (
            {"fastagi_unban": "no"},
            [["ban", "192.0.2.10", 600], ["unban", "192.0.2.10", 600]],
            0,
            ["ban 192.0.2.10 --for 600s --reason f2b-asterisk --hold f2b-asterisk@HOST"],
            ["OK ban 192.0.2.10", "OK unban 192.0.2.10"],
        ),
    ],
)
def test_action_calls_fastagi_ctl(tmp_path, opts, ops, rc, calls, results):
    fake = tmp_path / "fastagi-ctl"
    record = tmp_path / "calls"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit {rc}\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        [
            str(F2B_PYTHON),
            "-c",
            _ACTION_DRIVER,
            str(ROOT / "deploy" / "fail2ban"),
            json.dumps({"fastagi_ctl": str(fake), **opts}),
            json.dumps(ops),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == results, proc.stdout + proc.stderr
    # the default hold is per jail and host (fail2ban's <sh-hostname>)
    got = [
        re.sub(r"--hold f2b-asterisk@\S+", "--hold f2b-asterisk@HOST", line)
        for line in record.read_text().splitlines()
    ]
    if rc == 1:  # fail2ban's CommandAction retries a failed command: same call, repeated
        got = list(dict.fromkeys(got))
    assert got == calls


# The shortest complete lines each filter would accept, as a dialed number would have to write them
# (a leading LF, and a trailing LF where Asterisk's own tail does not end the line the right way).
# chan_sip keeps 79 characters of the dialed number (AST_MAX_EXTENSION 80): every one is longer.
SHORTEST_FORGERIES = [
    (
        "asterisk-fastagi",
        "asterisk[1]: NOTICE[1] chan_sip.c: Registration from '' failed for '1::' - Wrong password",
        2,
    ),
    (
        "asterisk-fastagi",
        "asterisk[1]: NOTICE[1][C-00000000] chan_sip.c: Call from '' (1:::1) to extension '"
        "' rejected because extension not found in context 'from-sip-external'.",
        1,
    ),
    (  # Asterisk 13 PJSIP form: no call id (res_pjsip logs it before the channel exists)
        "asterisk-fastagi",
        "asterisk[1]: NOTICE[1] res_pjsip_session.c: Call from '' (1:::1) to extension '"
        "' rejected because extension not found in context 'from-sip-external'.",
        1,
    ),
    (  # Asterisk 14+ PJSIP form (22: through ast_trace_log): IPv6 in brackets, no WS
        "asterisk-fastagi",
        "asterisk[1]: NOTICE[1] res_pjsip_session.c: x: Call (TCP:[1::]:1) to extension '"
        "' rejected because extension not found in context 'from-sip-external'.",
        1,
    ),
    (
        "asterisk-fastagi",
        "asterisk[1]: WARNING[1] res_pjsip_registrar.c: Endpoint '' (1:::1) has no configured AORs",
        2,
    ),
    (
        "asterisk-fastagi",
        'asterisk[1]: WARNING[1][C-00000000] Ext. s: "Rejecting unknown SIP connection from 1::"',
        2,
    ),
    (
        "asterisk-fastagi",
        "asterisk[1]: NOTICE[1] res_pjsip/pjsip_distributor.c: Request from '' failed for '1::'"
        " (callid: ) - Failed to authenticate",
        2,
    ),
    (
        "fastagi-notice",
        "asterisk[1]: NOTICE[1][C-00000000] Ext. : Incoming SIP connection from unknown peer"
        " failed for 1:: - Unknown connection from peer",
        2,
    ),
]
_ASTERISK_TAIL = "' rejected because extension not found in context 'from-sip-external'."


def test_shortest_forgeries_exceed_the_dialed_number_limit(tmp):
    for name, line, line_feeds in SHORTEST_FORGERIES:
        lines = tuple(forged for filt, forged, _ in SHORTEST_FORGERIES if filt == name)
        found = run_filter(_filter_path(name), lines, tmp)  # one run per filter (cached)
        assert found.get(line), (name, line, found)  # a forgery the filter would accept
        written = line.removesuffix(_ASTERISK_TAIL) if line_feeds == 1 else line
        assert len(written) + line_feeds > 79, (name, len(written) + line_feeds, line)


# Lines of the opt-in shortlines=yes: short enough for a dialed number to write in full, hence not
# in the default modes.  The default filter must ignore them; shortlines=yes takes them.
SHORT_LINES = [
    "asterisk[1]: NOTICE[1] manager.c: 1:: failed to pass IP ACL as ''",
    "asterisk[1]: NOTICE[1] chan_sip.c: hacking attempt detected '1::'",
    "asterisk[1]: NOTICE[1] chan_iax2.c: No registration for peer '' (from 1::)",
    "asterisk[1]: NOTICE[1] chan_iax2.c: Host 1:: failed to authenticate as '",
]


def test_short_lines_are_opt_in(tmp):
    base = _filter_path("asterisk-fastagi")
    assert run_filter(base, tuple(SHORT_LINES), tmp) == {}
    found = run_filter(f"{base}[shortlines=yes]", tuple(SHORT_LINES), tmp)
    assert set(found) == set(SHORT_LINES)
    assert all(len(line) + 2 <= 79 for line in SHORT_LINES[:3])  # two LFs: a complete forgery
    assert len(SHORT_LINES[3]) + 1 <= 79  # one LF: any Asterisk tail completes ".*$"


# ---------------------------------------------------------------------------------------------
# Asterisk 22.10.1 (PJSIP) lab captures: security log, messages log, pjproject drop lines
# ---------------------------------------------------------------------------------------------
def _load22() -> list[tuple[str, str, str, str]]:
    """(expected address, kind, source, raw line); the file keeps the captures' escapes."""
    rows = []
    for raw in (DATA_DIR / "asterisk22.tsv").read_text(encoding="utf-8").splitlines():
        if raw and not raw.startswith("#"):
            expect, kind, source, line = raw.split("\t", 3)
            rows.append((expect, kind, source, line.replace("\\r", "\r").replace("\\t", "\t")))
    return rows


ROWS22 = _load22()


def test_asterisk22_data_covers_the_captures():
    kinds = {kind for _, kind, _, _ in ROWS22}
    assert kinds == {"security", "logs", "drop", "none"}
    text = "\n".join(line for *_, line in ROWS22)
    for needle in (
        "No matching endpoint found",
        "Failed to authenticate",
        "has no configured AORs",
        'SecurityEvent="ChallengeResponseFailed"',
        'SecurityEvent="InvalidAccountID"',
        'SecurityEvent="FailedACL"',
        'Service="AMI"',
        "\r",  # CR bytes a client put into AccountID / digest fields
        "pjproject: \t",
        "from TCP 127.0.0.43:",
        "203.0.113.9",
        "] VERBOSE[",  # the full log: dialed numbers, Log() arguments
        "agi_arg_3: 203.0.113.9",  # a line an injected LF split off Asterisk's own VERBOSE line
    ):
        assert needle in text, needle
    assert {"::1", "127.0.0.41", "127.0.0.43"} <= {e for e, *_ in ROWS22}


# (mode, drops) -> the kinds of lines that must yield their address
MODES22 = {
    ("all", "no"): {"security", "logs"},
    ("all", "yes"): {"security", "logs", "drop"},
    ("logs", "no"): {"logs"},
    ("logs", "yes"): {"logs", "drop"},
    ("security", "no"): {"security"},
}


@pytest.mark.parametrize(("mode", "drops"), sorted(MODES22))
def test_asterisk22_lines(mode, drops, tmp):
    """Must show 3: every failure line of the real Asterisk 22 logs gives its true address, the
    "PJSIP syntax error" drop lines only with drops=yes, nothing else matches, nothing forged."""
    spec = f"{_filter_path('asterisk-fastagi')}[mode={mode}, drops={drops}]"
    found = run_filter(spec, tuple(dict.fromkeys(line for *_, line in ROWS22)), tmp)
    assert FORGED_ADDRESS not in found.values()
    want = MODES22[(mode, drops)]
    bad = [
        f"expected {expect if kind in want else '-'}, got {found.get(line, '-')}: {line!r}"
        for expect, kind, _, line in ROWS22
        if found.get(line, "-") != (expect if kind in want else "-")
    ]
    assert not bad, "\n".join(bad)
    assert len(found) >= (50 if mode == "security" else 100)


@pytest.mark.parametrize("form", FORMS[1:])
def test_asterisk22_lines_in_other_forms(form, tmp):
    """The same lines as the plain formatter, syslog and the journal write them."""
    spec = f"{_filter_path('asterisk-fastagi')}[mode=all, drops=yes]"
    rendered = [(expect, kind, to_form(line, form)) for expect, kind, _, line in ROWS22]
    found = run_filter(spec, tuple(dict.fromkeys(line for *_, line in rendered)), tmp)
    bad = [
        f"expected {expect}, got {found.get(line, '-')}: {line!r}"
        for expect, kind, line in rendered
        if found.get(line, "-") != (expect if kind != "none" else "-")
    ]
    assert not bad, "\n".join(bad)


def test_asterisk22_notice_lines_for_fastagi_notice(tmp):
    lines = tuple(dict.fromkeys(line for *_, line in ROWS22))
    found = run_filter(_filter_path("fastagi-notice"), lines, tmp)
    notice = re.compile(
        r"^\[[^\]]+\] NOTICE\[\d+\]\[C-[\da-f]{8}\] Ext\. \w+: Incoming SIP connection from"
        r" unknown peer failed for (\S+) - Unknown connection from peer$"
    )
    want = {line: m[1] for line in lines if (m := notice.match(line))}
    assert found == want
    assert set(want.values()) == {
        "127.0.0.40",
        "127.0.0.41",
        "127.0.0.42",
        "127.0.0.55",
        "127.0.0.90",
        "127.0.0.91",
        "::1",
    }


# ---------------------------------------------------------------------------------------------
# fail2ban's own Asterisk test log (tests/data/fail2ban/upstream/, see its README): every line it
# expects to match, with its expected address.  Lines after a "filterOptions" comment with
# "test.prefix-line" get that prefix, as fail2ban's own sample test runner does (journal lines).
# ---------------------------------------------------------------------------------------------
UPSTREAM_LOG = DATA_DIR / "upstream" / "asterisk"


def _upstream_cases() -> list[tuple[int, str, str]]:
    """(line number, expected address, log line) for each "# failJSON:" with "match": true."""
    cases, expect, prefix = [], None, ""
    lines = UPSTREAM_LOG.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("# failJSON:"):
            spec = json.loads(line.removeprefix("# failJSON:"))
            expect = spec["host"] if spec.get("match") else "-"
        elif line.startswith("# filterOptions:"):
            prefix = json.loads(line.removeprefix("# filterOptions:"))[0].get(
                "test.prefix-line", ""
            )
        elif line and not line.startswith("#") and expect is not None:
            cases.append((number, expect, prefix + line))
            expect = None
    return cases


UPSTREAM = _upstream_cases()


def test_upstream_suite_is_the_expected_one():
    assert len(UPSTREAM) == 48
    assert all(expect != "-" for _, expect, _ in UPSTREAM)


@pytest.mark.parametrize("shortlines", ["no", "yes"])
def test_upstream_asterisk_log(shortlines, tmp):
    """Must show 4: fail2ban's own test log through the real fail2ban-regex.  With shortlines=yes
    all 48 lines give fail2ban's expected address; by default the 7 AMI / chan_iax2 / "hacking
    attempt" lines (short enough for a dialed number to forge, see SHORT_LINES) are left out."""
    spec = f"{_filter_path('asterisk-fastagi')}[shortlines={shortlines}]"
    found = run_filter(spec, tuple(line for *_, line in UPSTREAM), tmp)
    short = re.compile(r" (?:manager\.c|chan_iax2\.c|chan_sip\.c: hacking attempt detected)")
    bad = []
    for number, expect, line in UPSTREAM:
        want = "-" if shortlines == "no" and short.search(line) else expect
        if found.get(line, "-") != want:
            bad.append(f"line {number}: expected {want}, got {found.get(line, '-')}: {line}")
    assert not bad, "\n".join(bad)
    assert len(found) == (48 if shortlines == "yes" else 41)


# ---------------------------------------------------------------------------------------------
# Generated variants of the three evasions: quotes, backslashes, CR bytes and whole injected
# separators ("' failed for '...", '",RemoteAddress="...') in the From header, the Call-ID (PJSIP
# NOTICE and SessionID), AccountID and the digest fields.  Each line carries its own true address;
# the filter must yield it or nothing, never 203.0.113.9, and must yield it whenever Asterisk's
# separator occurs only once on the line (and always for events with an Asterisk-only tail).
# ---------------------------------------------------------------------------------------------
_INJECTED = [
    "'",
    '"',
    "\\",
    "\\'",
    '\\"',
    "\r",
    "' failed for '203.0.113.9:5060' (callid: x",
    "' failed for '203.0.113.9:5060' (callid: x) - No matching endpoint found",
    ") - Failed to authenticate",
    '",RemoteAddress="IPV4/UDP/203.0.113.9/5060',
    '",RemoteAddress="IPV4/UDP/203.0.113.9/5060"',
    '",LocalAddress="IPV4/UDP/127.0.0.1/5060",RemoteAddress="IPV4/UDP/203.0.113.9/1111"',
    '",Challenge="',
    ",ExpectedResponse=",
]
# Endings that would complete a forged structure if a filter let client text move its match
_FORGED_ENDINGS = [
    "",
    '",LocalAddress="IPV4/UDP/127.0.0.1/5060",RemoteAddress="IPV4/UDP/203.0.113.9/1111',
    ") - No matching endpoint found' failed for '203.0.113.9:5060' (callid: y",
    "' failed for '203.0.113.9:5060' - Wrong password",
]
_client_text = st.tuples(
    st.lists(
        st.one_of(
            st.sampled_from(_INJECTED),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=6),
        ),
        max_size=5,
    ).map("".join),
    st.sampled_from(_FORGED_ENDINGS),
).map("".join)

_PJSIP = (
    "[Dec  2 11:41:05] NOTICE[11693] res_pjsip/pjsip_distributor.c: Request 'INVITE' from "
    "'\"{a}\" <sip:{b}@4.5.6.7>' failed for '{ip}:43678' (callid: {c}) - No matching endpoint found"
)
_SIP = (
    "[Dec  2 11:41:05] NOTICE[28502] chan_sip.c: Registration from '\"{a}\" <sip:{b}@4.5.6.7>{c}'"
    " failed for '{ip}:5060' - Wrong password"
)
_SECURITY = (
    '[Dec  2 11:41:05] SECURITY[11709] res_security_log.c: SecurityEvent="{event}",'
    'EventTV="2026-12-02T11:41:05.021+0000",Severity="Error",Service="PJSIP",EventVersion="1",'
    'AccountID="{a}",SessionID="{b}",LocalAddress="IPV4/UDP/127.0.0.1/5080",'
    'RemoteAddress="IPV4/UDP/{ip}/54798"{tail}'
)
_TAILS = {
    "InvalidAccountID": "",
    "FailedACL": ',ACLName="registrar_attempt_without_configured_aors"',
    "ChallengeResponseFailed": ',Challenge="{c}",Response="{c}",ExpectedResponse=""',
    "InvalidPassword": ',Challenge="5d2a",ReceivedChallenge="{c}",ReceivedHash="{c}"',
}


@st.composite
def _evasion(draw, ip: str) -> tuple[str, bool]:
    """A line with client text at every client-controlled place; True if it must match."""
    a, b, c = draw(_client_text), draw(_client_text), draw(_client_text)
    kind = draw(st.sampled_from(["pjsip", "sip", *_TAILS]))
    if kind == "pjsip":
        line = _PJSIP.format(a=a, b=b, c=c, ip=ip)
        return line, line.count("' failed for '") == 1
    if kind == "sip":  # anchored at the end: the To header may hold anything
        return _SIP.format(a=a, b=b, c=c, ip=ip), True
    tail = _TAILS[kind].format(c=c)
    line = _SECURITY.format(event=kind, a=a, b=b, ip=ip, tail=tail)
    fixed_tail = kind in ("InvalidAccountID", "FailedACL")
    return line, fixed_tail or line.count('",RemoteAddress="') == 1


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_generated_evasions_yield_the_true_address_or_nothing(data, tmp_path_factory):
    cases = [data.draw(_evasion(f"192.0.2.{n}")) for n in range(1, 41)]
    lines = tuple(dict.fromkeys(line for line, _ in cases))
    tmp = tmp_path_factory.getbasetemp()
    found = run_filter(_filter_path("asterisk-fastagi"), lines, tmp)
    assert FORGED_ADDRESS not in found.values()
    for n, (line, must_match) in enumerate(cases, 1):
        got = found.get(line)
        assert got in (None, f"192.0.2.{n}"), (got, line)
        assert got or not must_match, line


def test_pjproject_addresses_without_brackets(tmp):
    """pjproject prints an IPv6 source without brackets before ":port" (pj_sockaddr_print flag 0):
    the address is everything before the last colon."""
    lines = {
        "[Dec  2 11:41:14] WARNING[11698] pjproject: \t       sip_transport.c Dropping 652 bytes"
        " packet from UDP 2001:db8::5:5060 : PJSIP syntax error exception when parsing"
        " 'Authorization' header on line 10 col 38": "2001:db8::5",
        "[Dec  2 11:41:10] WARNING[11693] res_pjsip_registrar.c: Endpoint 'anonymous'"
        " (2001:db8::7:36853) has no configured AORs": "2001:db8::7",
    }
    spec = f"{_filter_path('asterisk-fastagi')}[mode=logs, drops=yes]"
    assert run_filter(spec, tuple(lines), tmp) == lines
