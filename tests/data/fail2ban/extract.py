# ruff: noqa: E501  (long log-format regexes and header lines, kept on one line each)
"""Regenerate captured.tsv from the lab captures (not run by the tests).

    python tests/data/fail2ban/extract.py /path/to/shared/asterisk

Takes every distinct physical log line of the capture files verbatim and writes the address each
filter must yield, by plain reading of the known line formats (reviewed by hand afterwards).
"""

import pathlib
import re
import sys

SRC = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "shared/asterisk")
OUT = pathlib.Path(__file__).resolve().parent / "captured.tsv"
files = [
    "log-registration.txt",
    "log-security.txt",
    "log-notice.txt",
    "attacker-controlled-exten.txt",
    "dialplan-h-fallthrough.txt",
    "agi-commands.txt",
    "agi-hangup.txt",
    "agi-timing.txt",
    "agi-env-chan_sip.txt",
    "sip-examples.txt",
]
DATE = re.compile(r"^\s*(\[[A-Z][a-z]{2} [ 0-9][0-9] \d\d:\d\d:\d\d\] .*)$")
seen = {}
order = []
for f in files:
    for raw in (SRC / f).read_text().splitlines():
        m = DATE.match(raw)
        line = None
        if m:
            line = m.group(1)
        elif (
            f == "attacker-controlled-exten.txt"
            and raw.startswith("     ")
            and raw.rstrip().endswith("$")
        ):
            line = raw.strip()  # continuation lines of a split log line (cat -A view)
        if not line:
            continue
        if f == "attacker-controlled-exten.txt" and line.endswith("$"):
            line = line[:-1]  # cat -A end-of-line marker
        if not line:
            continue
        if line not in seen:
            seen[line] = f
            order.append(line)
SEC_FAIL = {"InvalidAccountID", "ChallengeResponseFailed", "InvalidPassword", "FailedACL"}


def expect_ast(line):
    m = re.match(
        r'^\[[^\]]+\] SECURITY\[\d+\] res_security_log\.c: SecurityEvent="(\w+)".*RemoteAddress="IPV4/UDP/([\d.]+)/\d+"',
        line,
    )
    if m:
        return m.group(2) if m.group(1) in SEC_FAIL else "-"
    m = re.match(
        r"^\[[^\]]+\] NOTICE\[\d+\] chan_sip\.c: Registration from '.*' failed for '([\d.]+):\d+' - (.*)$",
        line,
    )
    if m:
        return m.group(1)
    m = re.match(
        r"^\[[^\]]+\] NOTICE\[\d+\]\[C-[0-9a-f]{8}\] chan_sip\.c: Call from '' \(([\d.]+):\d+\) to extension '.*' rejected because extension not found in context '[^']*'\.$",
        line,
    )
    if m:
        return m.group(1)
    return "-"


def expect_notice(line):
    m = re.match(
        r"^\[[^\]]+\] NOTICE\[\d+\]\[C-[0-9a-f]{8}\] Ext\. .*: Incoming SIP connection from unknown peer failed for ([\d.]+) - Unknown connection from peer$",
        line,
    )
    return m.group(1) if m else "-"


out = [
    "# Real Asterisk 20.20.1 log lines, verbatim, extracted from shared/asterisk/*.txt (one physical line each;",
    '# for attacker-controlled-exten.txt the "$" end-of-line marker of its cat -A view is removed).',
    "# Columns (TAB-separated): expected address for asterisk-fastagi.conf, expected address for",
    '# fastagi-notice.conf ("-" = must not match), source capture file, the log line.',
]
for line in order:
    assert "\t" not in line
    out.append("\t".join([expect_ast(line), expect_notice(line), seen[line], line]))
OUT.write_text("\n".join(out) + "\n")
print(len(order))
