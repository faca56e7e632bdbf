"""Runs the shipped dialplan (dialplan/extensions-fastagi.conf) for one guest call, as
Asterisk would, with AGI() played by the emulator against a real server.

Only what the shipped file uses: GotoIf/Goto/Gosub/Return/Set/Log/NoOp/Hangup/AGI, `${...}`
with LEN, FILTER, CUT, CALLERID(num), the channel functions of `emulator.Call`, substrings,
and `$[a = b]` / `$[a != b]`. It lets CI check what the file does with every answer the
server can give (and with none), which the static checks of test_dialplan.py cannot.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastagi.emulator import Call, CallResult
from tests.test_dialplan import Dialplan, parse, split_args

SHIPPED = Path(__file__).resolve().parent.parent / "dialplan" / "extensions-fastagi.conf"

Agi = Callable[[str, Call], Awaitable[CallResult]]


@dataclass
class Run:
    """What one call did: the log lines of Log() ("NOTICE Ext. 7001: ..."), the AGI
    sessions it opened, the hangup cause it ended with."""

    log: list[str] = field(default_factory=list)
    agi: list[CallResult] = field(default_factory=list)
    cause: str = ""
    variables: dict[str, str] = field(default_factory=dict)


def matches(pattern: str, exten: str) -> bool:
    """Asterisk's matching for the patterns of the shipped file ('-' is skipped)."""
    if not pattern.startswith("_"):
        return pattern == exten
    body = pattern[1:].replace("-", "")
    exten = exten.replace("-", "")
    if body == "!":
        return True
    if body == ".":
        return exten != ""
    raise ValueError(f"pattern {pattern!r} not supported here")


def _closing(text: str, start: int) -> int:
    """Index of the '}' that closes the '${' at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text.startswith("${", i):
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unclosed ${{ in {text!r}")


class Channel:
    def __init__(self, call: Call, dialplan: Dialplan, agi: Agi) -> None:
        self.call, self.dialplan, self.agi = call, dialplan, agi
        self.vars: dict[str, str] = {"HANGUPCAUSE": "0"}
        self.functions = call.functions() | {"CALLERID(num)": call.callerid}
        self.run = Run(variables=self.vars)
        self.context, self.exten, self.priority = call.context, call.exten, 1
        self.stack: list[tuple[str, str, int]] = []

    # -- expressions ----------------------------------------------------------------
    def substitute(self, text: str) -> str:
        out, i = [], 0
        while (start := text.find("${", i)) >= 0:
            end = _closing(text, start)
            out.append(text[i:start])
            out.append(self._value(self.substitute(text[start + 2 : end])))
            i = end + 1
        out.append(text[i:])
        text = "".join(out)
        if text.startswith("$[") and text.endswith("]"):
            return self._expression(text[2:-1])
        return text

    def _value(self, name: str) -> str:
        if name in self.functions:
            return self.functions[name]
        if name == "EXTEN":
            return self.exten
        m = re.fullmatch(r"(\w+)\((.*)\)", name, re.S)
        if m:
            fn, args = m.group(1), m.group(2)
            if fn == "LEN":
                return str(len(args))
            if fn == "FILTER":
                allowed, _, text = args.partition(",")
                ranges = re.findall(r"(.)-(.)|(.)", allowed)
                ok = {
                    chr(c) for a, b, one in ranges for c in range(ord(a or one), ord(b or one) + 1)
                }
                return "".join(ch for ch in text if ch in ok)
            if fn == "CUT":
                var, delim, field_ = args.split(",")
                return self.vars.get(var, "").split(delim)[int(field_) - 1]
            raise ValueError(f"function {fn} not supported here")
        m = re.fullmatch(r"(\w+):(-?\d+)(?::(\d+))?", name)
        if m:
            value, offset = self.vars.get(m.group(1), ""), int(m.group(2))
            return value[offset : offset + int(m.group(3))] if m.group(3) else value[offset:]
        return self.vars.get(name, "")

    @staticmethod
    def _expression(text: str) -> str:
        m = re.fullmatch(r'\s*("[^"]*"|\S+)\s*(!=|=)\s*("[^"]*"|\S+)\s*', text)
        if not m:
            raise ValueError(f"expression {text!r} not supported here")
        left, op, right = (m.group(1).strip('"'), m.group(2), m.group(3).strip('"'))
        if left.isdigit() and right.isdigit():
            left, right = str(int(left)), str(int(right))
        return "1" if (left == right) == (op == "=") else "0"

    # -- the PBX loop -------------------------------------------------------------------
    def _goto(self, dest: str) -> None:
        parts = [p.strip() for p in dest.split(",")]
        steps = self._steps()
        if len(parts) == 1:
            self.priority = next(s.priority for s in steps if s.label == parts[0])
        else:
            self.context, self.exten, self.priority = parts[0], parts[1], int(parts[2])

    def _steps(self):
        extens = self.dialplan.contexts[self.context]
        exact = extens.get(self.exten)
        if exact is not None and any(s.priority == self.priority for s in exact):
            return exact
        for pattern, steps in extens.items():
            if matches(pattern, self.exten) and any(s.priority == self.priority for s in steps):
                return steps
        raise LookupError(f"no {self.exten},{self.priority} in [{self.context}]")

    async def start(self) -> Run:
        for _ in range(200):
            if self.run.cause:
                break
            step = next(s for s in self._steps() if s.priority == self.priority)
            self.priority += 1
            await self._execute(step.app, step.args)
        else:
            raise RuntimeError("the dialplan did not end")
        # Asterisk runs `h` of the context the call ended in.
        if "h" in self.dialplan.contexts[self.context]:
            self.vars["HANGUPCAUSE"] = self.run.cause
            self.exten, self.priority, cause = "h", 1, self.run.cause
            self.run.cause = ""
            for _ in range(50):
                if self.run.cause:
                    break
                step = next(s for s in self._steps() if s.priority == self.priority)
                self.priority += 1
                await self._execute(step.app, step.args)
            self.run.cause = cause
        return self.run

    async def _execute(self, app: str, raw: str) -> None:
        if app == "GotoIf":
            condition, _, dests = raw.partition("?")
            yes, _, no = dests.partition(":")
            value = self.substitute(condition)
            dest = yes if value not in ("", "0") else no
            if dest:
                self._goto(dest)
        elif app == "Goto":
            self._goto(raw)
        elif app == "Gosub":
            context, exten, prio = (self.substitute(a) for a in split_args(raw))
            self.stack.append((self.context, self.exten, self.priority))
            self.context, self.exten, self.priority = context, exten, int(prio)
        elif app == "Return":
            self.context, self.exten, self.priority = self.stack.pop()
        elif app == "Set":
            name, _, value = raw.partition("=")
            self.vars[name] = self.substitute(value)
        elif app == "Log":
            level, _, text = raw.partition(",")
            self.run.log.append(f"{level} Ext. {self.exten}: {self.substitute(text)}")
        elif app == "NoOp":
            self.substitute(raw)
        elif app == "Hangup":
            self.run.cause = raw or "16"
        elif app == "AGI":
            url = self.substitute(split_args(raw)[0])
            call = Call(**{**self.call.__dict__, "exten": self.exten})
            result = await self.agi(url, call)
            self.run.agi.append(result)
            self.vars.update(result.variables)
            self.vars["AGISTATUS"] = result.agistatus
        else:
            raise ValueError(f"application {app} not supported here")


async def run_call(call: Call, agi: Agi, path: Path = SHIPPED) -> Run:
    """One guest call through the shipped context `call.context`."""
    return await Channel(call, parse(path.read_text()), agi).start()
