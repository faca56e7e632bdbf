"""Static checks of the shipped dialplan (dialplan/extensions-fastagi.conf).

A small parser of Asterisk's extensions.conf syntax (contexts, `exten =>`, `same =>`, numeric and
`n` priorities, `n(label)` labels, `;` comments) reads the files; the checks follow the findings
of the real Asterisk 20 lab (shared/asterisk/): explicit `h` ending in Hangup(), AGI route
`screen` without arguments that could be shifted, and a guard on the dialed text before the
first Log()/AGI().
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

DIALPLAN_DIR = Path(__file__).resolve().parent.parent / "dialplan"
FILES = ["extensions-fastagi.conf"]
# Every dialed string, without the load-time WARNING pbx_config prints for exactly "_." and
# "_!" (one per line of the extension): '-' is skipped in patterns, so this is "_!".
CATCH_ALL = "_-!"


@dataclass
class Step:
    priority: int
    label: str | None
    app: str
    args: str
    lineno: int


@dataclass
class Dialplan:
    contexts: dict[str, dict[str, list[Step]]] = field(default_factory=dict)


class ParseError(Exception):
    pass


def _strip_comment(line: str) -> str:
    out = []
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            out.append(line[i : i + 2])
            i += 2
            continue
        if ch == ";":
            break
        out.append(ch)
        i += 1
    return "".join(out).strip()


def _split_app(text: str, lineno: int) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([A-Za-z_][\w]*)\s*(?:\((.*)\))?\s*", text, re.S)
    if not m:
        raise ParseError(f"line {lineno}: cannot parse application {text!r}")
    return m.group(1), m.group(2) or ""


def parse(text: str) -> Dialplan:
    dp = Dialplan()
    context: str | None = None
    last_exten: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        m = re.fullmatch(r"\[([^\]]+)\](?:\([^)]*\))?", line)
        if m:
            context = m.group(1)
            if context in dp.contexts:
                raise ParseError(f"line {lineno}: context [{context}] defined twice")
            dp.contexts[context] = {}
            last_exten = None
            continue
        m = re.fullmatch(r"(exten|same|include)\s*=>?\s*(.*)", line)
        if not m:
            raise ParseError(f"line {lineno}: unknown statement {line!r}")
        if context is None:
            raise ParseError(f"line {lineno}: statement outside a context")
        kind, rest = m.groups()
        if kind == "include":
            continue
        if kind == "exten":
            exten, _, rest = rest.partition(",")
            exten = exten.strip()
        else:
            if last_exten is None:
                raise ParseError(f"line {lineno}: 'same' without a preceding 'exten'")
            exten = last_exten
        prio_text, _, app_text = rest.partition(",")
        pm = re.fullmatch(r"\s*(\d+|n|hint)(?:\(([\w-]+)\))?\s*", prio_text)
        if not pm:
            raise ParseError(f"line {lineno}: bad priority {prio_text!r}")
        steps = dp.contexts[context].setdefault(exten, [])
        if pm.group(1) == "hint":
            continue
        if pm.group(1) == "n":
            if not steps:
                raise ParseError(f"line {lineno}: priority n without a priority 1")
            priority = steps[-1].priority + 1
        else:
            priority = int(pm.group(1))
        app, args = _split_app(app_text, lineno)
        steps.append(Step(priority, pm.group(2), app, args, lineno))
        last_exten = exten
    return dp


def split_args(args: str) -> list[str]:
    """Split application arguments on top-level commas (outside ${...}, $[...], (...))."""
    parts, depth, cur = [], 0, []
    for ch in args:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def pattern_matches(pattern: str, exten: str) -> bool:
    """Asterisk extension matching (the subset used here): _X _Z _N [..] . !"""
    if not pattern.startswith("_"):
        return pattern == exten
    rx = ""
    i, p = 0, pattern[1:].replace("-", "")  # Asterisk skips '-' in patterns and extensions
    exten = exten.replace("-", "")
    while i < len(p):
        c = p[i]
        if c == "X":
            rx += "[0-9]"
        elif c == "Z":
            rx += "[1-9]"
        elif c == "N":
            rx += "[2-9]"
        elif c == ".":
            rx += ".+"
        elif c == "!":
            rx += ".*"
        elif c == "[":
            j = p.index("]", i)
            rx += "[" + p[i + 1 : j] + "]"
            i = j
        else:
            rx += re.escape(c)
        i += 1
    return re.fullmatch(rx, exten, re.S) is not None


@pytest.fixture(scope="module", params=FILES)
def dialplan(request) -> tuple[str, Dialplan]:
    path = DIALPLAN_DIR / request.param
    assert path.is_file(), path
    return request.param, parse(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------
def test_parser_on_the_seed_and_the_lab_fallthrough():
    seed = parse(
        "[from-sip-external]\n"
        "exten => _.,1,NoOp(Received incoming SIP connection from unknown peer to ${EXTEN})\n"
        "exten => _.,n,Set(foo=${SIPCHANINFO(recvip)})\n"
        "exten => _.,n,Log(NOTICE,Incoming SIP connection from unknown peer failed for ${foo})\n"
        "exten => _.,n,Hangup\n"
    )
    steps = seed.contexts["from-sip-external"]["_."]
    assert [s.priority for s in steps] == [1, 2, 3, 4]
    assert [s.app for s in steps] == ["NoOp", "Set", "Log", "Hangup"]
    assert split_args(steps[2].args)[0] == "NOTICE"
    assert pattern_matches("_.", "h") and not pattern_matches("_X.", "h")
    assert pattern_matches("_[+0-9a-zA-Z].", "+99") and not pattern_matches("_X.", "1")
    with pytest.raises(ParseError):
        parse("exten => _.,1,NoOp()\n")
    with pytest.raises(ParseError):
        parse("[c]\n same => n,NoOp()\n")


def test_contexts_exist(dialplan):
    _, dp = dialplan
    assert "from-sip-external" in dp.contexts
    assert "fastagi-bad-exten" in dp.contexts
    assert CATCH_ALL in dp.contexts["from-sip-external"]
    assert "s" in dp.contexts["fastagi-bad-exten"]
    assert CATCH_ALL in dp.contexts["fastagi-notice"]


def test_no_pattern_draws_the_load_warning_and_every_dialed_string_matches(dialplan):
    """pbx_config warns once per line of an extension named exactly "_." or "_!" (checked
    on 20.20.1 and 22.10.1); `_-!` also matches a lone "-", which `_.` answered 484."""
    _, dp = dialplan
    for extens in dp.contexts.values():
        assert not {"_.", "_!"} & set(extens)
    for exten in ("7001", "a", "-", "x-y", "9\n[Nov 24", "\u00e9", " ", "s", "h"):
        assert pattern_matches(CATCH_ALL, exten), exten


def test_priorities_are_consecutive_and_labels_unique(dialplan):
    _, dp = dialplan
    for ctx, extens in dp.contexts.items():
        for exten, steps in extens.items():
            prios = [s.priority for s in steps]
            assert prios == list(range(1, len(steps) + 1)), (ctx, exten, prios)
            labels = [s.label for s in steps if s.label]
            assert len(labels) == len(set(labels)), (ctx, exten, labels)


def h_problems(dp: Dialplan) -> list[str]:
    problems = []
    for ctx, extens in dp.contexts.items():
        catches_h = any(pattern_matches(e, "h") for e in extens if e.startswith("_"))
        if catches_h and "h" not in extens:
            problems.append(f"[{ctx}] needs an explicit h extension")
        if "h" in extens:
            steps = extens["h"]
            if len(steps) < 2 or steps[-1].app != "Hangup":
                problems.append(f"[{ctx}] h must end in its own Hangup() after priority 1")
    return problems


def test_h_check_catches_the_lab_fallthrough():
    """dialplan-h-fallthrough.txt: an h with only priority 1 fell through into _. (AGI twice)."""
    lab = parse(
        "[from-sip-external]\n"
        "exten => _.,1,NoOp()\n same => n,AGI(agi://127.0.0.1:4573/screen)\n same => n,Hangup\n"
        "exten => h,1,Log(NOTICE,h-exten)\n"
    )
    assert h_problems(lab)
    seed = parse("[from-sip-external]\nexten => _.,1,NoOp()\nexten => _.,n,Hangup\n")
    assert h_problems(seed)


def test_h_extension_ends_in_hangup_wherever_a_pattern_would_catch_h(dialplan):
    _, dp = dialplan
    assert not h_problems(dp)
    for ctx in ("from-sip-external", "fastagi-bad-exten"):
        assert "h" in dp.contexts[ctx]


def test_every_extension_ends_in_hangup(dialplan):
    """No extension may run off its end (and on into a pattern, like h did in the lab);
    the subroutine's ends in Return() and is reached only by Gosub."""
    _, dp = dialplan
    called = {
        split_args(s.args)[0]
        for extens in dp.contexts.values()
        for steps in extens.values()
        for s in steps
        if s.app == "Gosub"
    }
    assert called == {"fastagi-notice"}
    for ctx, extens in dp.contexts.items():
        for exten, steps in extens.items():
            end = "Return" if ctx in called and exten != "h" else "Hangup"
            assert steps[-1].app == end, (ctx, exten, steps[-1])


def test_agi_calls_use_route_screen_without_shiftable_arguments(dialplan):
    _, dp = dialplan
    calls = [
        s
        for extens in dp.contexts.values()
        for steps in extens.values()
        for s in steps
        if s.app.upper() == "AGI"
    ]
    assert len(calls) >= 2
    for step in calls:
        args = split_args(step.args)
        url = urlsplit(args[0])
        assert url.scheme == "agi", step
        assert url.hostname == "127.0.0.1" and url.port == 4573, step
        assert url.path == "/screen", step
        # the optional shared key, from a global the admin sets (empty: a server without one)
        assert url.query == "key=${FASTAGI_KEY}", step
        # no SOURCE for SIP/PJSIP (the server asks Asterisk); ${EXTEN}, if ever added, only last
        for i, arg in enumerate(args[1:], 1):
            if "EXTEN" in arg:
                assert i == len(args) - 1, f"${{EXTEN}} must be the last AGI argument: {step}"
            else:
                raise AssertionError(f"unexpected AGI argument {arg!r} at line {step.lineno}")


def test_no_sipchaninfo(dialplan):
    name, _ = dialplan
    text = (DIALPLAN_DIR / name).read_text(encoding="utf-8")
    code = "\n".join(_strip_comment(line) for line in text.splitlines())
    assert "SIPCHANINFO" not in code


def _guard(variable: str) -> re.Pattern[str]:
    """`GotoIf` on two lengths: the text of `variable` with and without FILTER()."""
    v = re.escape(variable)
    return re.compile(
        rf"^\$\[\$\{{LEN\(\$\{{FILTER\((?P<allowed>[^,]+),\$\{{{v}\}}\)\}}\)\}}"
        rf" != \$\{{LEN\(\$\{{{v}\}}\)\}}\]"
        r"\?(?P<target>[\w-]+),(?P<exten>[\w]+),(?P<prio>\d+)$"
    )


@pytest.mark.parametrize("variable", ["EXTEN", "CALLERID(num)"])
def test_guards_run_before_any_log_or_agi(dialplan, variable):
    """The dialed number and the caller ID (From user: chan_sip URL-decodes both, so both may
    carry line feeds into Asterisk's log lines and the AGI environment) are checked first."""
    _, dp = dialplan
    steps = dp.contexts["from-sip-external"][CATCH_ALL]
    assert steps[0].app == "GotoIf", "priority 1 of the pattern must be the EXTEN guard"
    guards = [(s, _guard(variable).match(s.args)) for s in steps if s.app == "GotoIf"]
    guard, m = next((s, m) for s, m in guards if m)
    assert m["allowed"] == "0-9a-zA-Z+*#"
    target = dp.contexts[m["target"]][m["exten"]]
    assert 1 <= int(m["prio"]) <= len(target)
    # the guarded-off context never uses the raw dialed text or caller ID again
    for steps_ in dp.contexts[m["target"]].values():
        for s in steps_:
            assert "EXTEN" not in s.args and "CALLERID" not in s.args, s
    # the guard comes before the first step that logs or hands the text on
    uses = ("Log", "AGI", "Verbose", "NoOp", "Gosub")
    first_use = min(i for i, s in enumerate(steps) if s.app in uses)
    assert steps.index(guard) < first_use
    assert all(variable not in s.args for s in steps[: steps.index(guard)])


def test_guard_character_class_blocks_log_splitting():
    """FILTER(0-9a-zA-Z+*#, x) == x exactly for the dialed strings that cannot split a line."""
    allowed = re.compile(r"[0-9a-zA-Z+*#]*")

    def passes(exten: str) -> bool:
        filtered = "".join(ch for ch in exten if allowed.fullmatch(ch))
        return len(filtered) == len(exten)

    for good in ("123456", "+4930123", "*97", "#", "s", "00972597886748", "abc"):
        assert passes(good)
    for bad in (
        "9\n[Nov 24 22:00:00] NOTICE[1] x: failed for '203.0.113.9:5060' - Wrong password",
        "556\r\n[Nov 24 22",
        "560,203.0.113.9",
        '558"quote',
        "557 with spaces",
        "x-y",
        "a.b",
        "127.0.0.1:5060",
        "x\nagi_arg_1: 203.0.113.77",  # a From user that forged agi_arg_1 (issue 12)
        "anonymous\r\n",
    ):
        assert not passes(bad), bad


def test_goto_targets_resolve(dialplan):
    _, dp = dialplan
    for ctx, extens in dp.contexts.items():
        for exten, steps in extens.items():
            labels = {s.label for s in steps if s.label}
            for s in steps:
                if s.app not in ("Goto", "GotoIf"):
                    continue
                dests = s.args.rpartition("?")[2] if s.app == "GotoIf" else s.args
                for dest in dests.split(":"):
                    parts = [p.strip() for p in dest.split(",")]
                    if len(parts) == 1:
                        assert parts[0] in labels, (ctx, exten, s)
                    elif len(parts) == 3:
                        assert parts[0] in dp.contexts, (ctx, exten, s)
                        assert parts[1] in dp.contexts[parts[0]], (ctx, exten, s)
                    else:
                        raise AssertionError(f"unsupported Goto form {dest!r} at line {s.lineno}")


def test_result_handling(dialplan):
    """BANNED hangs up; every other answer, and none, reaches the guest handling (fail
    open), after the NOTICE subroutine. What the file does with each answer: see
    test_every_call_seen.py, which runs it."""
    _, dp = dialplan
    steps = dp.contexts["from-sip-external"][CATCH_ALL]
    by_label = {s.label: s for s in steps if s.label}
    assert by_label["banned"].app == "Hangup"
    agi_index = next(i for i, s in enumerate(steps) if s.app == "AGI")
    assert steps[agi_index + 1].app == "Gosub"
    assert steps[agi_index + 2].args == '$["${SCREEN_RESULT}" = "BANNED"]?banned'
    # nothing between AGI() and the guest label hangs up: ERROR / unreachable server fail open
    guest_index = steps.index(by_label["guest"])
    assert all(s.app != "Hangup" for s in steps[agi_index:guest_index])
