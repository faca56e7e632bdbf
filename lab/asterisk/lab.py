#!/usr/bin/env python3
"""A real Asterisk in the loop: the end-to-end check of fastagi-screen (not part of CI).

    sudo .venv/bin/python lab/asterisk/lab.py --asterisk PREFIX/inst [--work DIR]

PREFIX/inst is an Asterisk that lab/asterisk/build.sh installed (20.20.1: chan_sip and
PJSIP; 22.10.1: PJSIP). The lab makes two network namespaces from tests/netns.py (a PBX
and an attacker, documentation addresses, nothing on the host touched), writes a private
Asterisk config with guest access and the shipped dialplans, runs Asterisk and
`fastagi-ctl serve` (embedded store, nftables) in the PBX namespace, sends real SIP from
the attacker namespace and prints a pass/fail table. Exit 0 when every check passed.

Why namespaces: a ban must be seen on the wire (the banned caller's next INVITE gets no
answer), and the firewall we change must be one we made.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.netns import Namespace, Topology, make_topology  # noqa: E402

HOSTS = {"attacker": (10, (11, 12, 13, 14, 15, 16, 17, 18, 19)), "pbx1": (21, ())}
# The IPv6 caller sits in a /64 of its own: the topology's shared /64 holds the PBX itself,
# which the service never counts (it would count and ban per /64).
ATTACKER6, NET6 = "2001:db8:1::10", "2001:db8:1::/64"
THRESHOLD = 5
USER, PASSWORD = "200", "correct-horse-200"  # the lab's one real account
AMI_USER, AMI_SECRET = "fastagi", "lab-ami-secret"  # the watcher's login (read = security)
FORGED = "203.0.113.9"  # the address every injection payload tries to get counted
# A From user that forged agi_arg_1 into the env block of a Local-channel AGI (issue 12).
FORGED_SOURCE = "203.0.113.77"
HOSTILE_FROM = f"x%0Aagi_arg_1%3A%20{FORGED_SOURCE}"
KEY = secrets.token_hex(16)  # the AGI URL's shared key for this run (server.key_file)
LOCAL_SOURCE = "198.51.100.30"  # the SOURCE argument of the lab's Local-channel AGI calls
# Request-URI user parts of /shared captures (attacker-controlled-exten.txt): log-line
# forging, env-block injection, a forged answer, CR and comma splitting.
INJECTIONS = (
    "9%0A[Nov%2024%2022%3A00%3A00]%20NOTICE[1]%20x%3A%20failed%20for%20'203.0.113.9%3A5060'"
    "%20-%20Wrong%20password",
    "559%0Aagi_arg_3%3A%20203.0.113.9%0A%0Aagi_x%3A%20y",
    "1%0A200%20result%3D1%20(203.0.113.9)%0A",
    "77%0D%0Aagi_arg_1%3A%20203.0.113.9",
    "5%2C203.0.113.9%2C%22x",
)


@dataclass
class Stack:
    """One SIP stack of the Asterisk under test, as the attacker reaches it."""

    name: str  # chan_sip | PJSIP
    port: int
    transports: tuple[str, ...]  # udp, tcp, udp6


@dataclass
class Result:
    check: str
    ok: bool
    detail: str


# -- Asterisk: config, start, CLI ----------------------------------------------------


def asterisk_version(inst: Path) -> str:
    out = subprocess.run(
        [str(inst / "sbin" / "asterisk"), "-V"], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[-1]


def stacks_of(inst: Path) -> list[Stack]:
    """chan_sip (when built) on 5060; PJSIP on 5061 beside it, else on 5060."""
    modules = inst / "lib" / "asterisk" / "modules"
    if (modules / "chan_sip.so").exists():
        return [Stack("chan_sip", 5060, ("udp",)), Stack("PJSIP", 5061, ("udp", "tcp", "udp6"))]
    return [Stack("PJSIP", 5060, ("udp", "tcp", "udp6"))]


def write_config(work: Path, inst: Path, stacks: list[Stack]) -> Path:
    """A private Asterisk config with guest access and the shipped dialplan verbatim
    (one file for chan_sip and PJSIP: both stacks send guests to its context)."""
    etc, var = work / "etc", work / "var"
    for d in (etc, var / "lib", var / "spool", var / "run", var / "log"):
        d.mkdir(parents=True, exist_ok=True)
    (etc / "asterisk.conf").write_text(
        "[directories]\n"
        f"astetcdir => {etc}\nastmoddir => {inst}/lib/asterisk/modules\n"
        f"astvarlibdir => {var}/lib\nastdbdir => {var}/lib\nastkeydir => {var}/lib\n"
        f"astdatadir => {inst}/var/lib/asterisk\nastagidir => {var}/lib\n"
        f"astspooldir => {var}/spool\nastrundir => {var}/run\nastlogdir => {var}/log\n"
        f"astsbindir => {inst}/sbin\n\n[options]\nverbose = 3\nmaxload = 0\n"
    )
    (etc / "modules.conf").write_text("[modules]\nautoload = yes\n")
    # the AMI user of deploy/asterisk/manager-fastagi.conf: security events, nothing else
    (etc / "manager.conf").write_text(
        "[general]\nenabled = yes\nport = 5038\nbindaddr = 127.0.0.1\n\n"
        f"[{AMI_USER}]\nsecret = {AMI_SECRET}\nread = security\nwrite =\n"
        "deny = 0.0.0.0/0.0.0.0\npermit = 127.0.0.1/255.255.255.255\n"
    )
    (etc / "logger.conf").write_text(
        "[general]\n[logfiles]\nfull => notice,warning,error,verbose,security\n"
        "messages => notice,warning,error\nsecurity => security\n"
    )
    for name in ("cdr.conf", "cel.conf"):
        (etc / name).write_text("[general]\nenable = no\n")
    shipped = ROOT / "dialplan" / "extensions-fastagi.conf"
    dialplan = ["[general]\nstatic = yes\nwriteprotect = yes\n\n", shipped.read_text()]
    for stack in stacks:
        if stack.name == "chan_sip":
            (etc / "sip.conf").write_text(
                "[general]\ncontext = from-sip-external\nallowguest = yes\n"
                f"alwaysauthreject = yes\nudpbindaddr = 0.0.0.0:{stack.port}\n"
                "tcpenable = no\nsrvlookup = no\nallow = !all,ulaw\n\n"
                f"[{USER}]\ntype = friend\nhost = dynamic\nsecret = {PASSWORD}\n"
                "context = from-internal\n"
            )
        else:
            transports = []
            for proto in stack.transports:
                bind = f"[::]:{stack.port}" if proto.endswith("6") else f"0.0.0.0:{stack.port}"
                transports.append(
                    f"[transport-{proto}]\ntype = transport\nprotocol = {proto[:3]}\n"
                    f"bind = {bind}\n"
                )
            (etc / "pjsip.conf").write_text(
                "\n".join(transports)
                + "\n[anonymous]\ntype = endpoint\ncontext = from-sip-external\n"
                "disallow = all\nallow = ulaw\n\n"
                f"[{USER}]\ntype = endpoint\ncontext = from-internal\nauth = {USER}-auth\n"
                f"aors = {USER}\nidentify_by = username,auth_username\n"
                f"[{USER}-auth]\ntype = auth\nauth_type = userpass\nusername = {USER}\n"
                f"password = {PASSWORD}\n[{USER}]\ntype = aor\nmax_contacts = 1\n"
            )
    dialplan.append("[from-internal]\nexten => _X.,1,Hangup()\n")
    # The key as dialplan/README.md says: [globals] includes a file only Asterisk reads.
    (etc / "fastagi-key.conf").write_text(f"FASTAGI_KEY={KEY}\n")
    os.chmod(etc / "fastagi-key.conf", 0o640)
    dialplan.insert(1, '[globals]\n#include "fastagi-key.conf"\n')
    # Lab only: Local channels reaching AGI with a caller ID that carries a line feed and
    # a forged agi_arg_1 (the From user above, URL-decoded as chan_sip does), with and
    # without a SOURCE argument.
    forged = f"${{URIDECODE({HOSTILE_FROM})}}"
    url = "agi://127.0.0.1:4573/screen?key=${FASTAGI_KEY}"
    notice = " same => n,Gosub(fastagi-notice,${EXTEN},1)\n"  # as the shipped file does
    dialplan.append(
        "[fastagi-lab-local]\n"
        f"exten => forged,1,Set(CALLERID(num)={forged})\n same => n,AGI({url})\n"
        f"{notice} same => n,Hangup()\n"
        f"exten => forged-source,1,Set(CALLERID(num)={forged})\n"
        f" same => n,AGI({url},{LOCAL_SOURCE})\n{notice} same => n,Hangup()\n"
        f"exten => clean-source,1,AGI({url},{LOCAL_SOURCE})\n{notice} same => n,Hangup()\n"
    )
    (etc / "extensions.conf").write_text("\n".join(dialplan))
    return etc / "asterisk.conf"


class Asterisk:
    def __init__(self, inst: Path, conf: Path, ns: Namespace, log: Path) -> None:
        self.binary, self.conf, self.ns = inst / "sbin" / "asterisk", conf, ns
        with log.open("ab") as out:
            ns.spawn([str(self.binary), "-C", str(conf), "-f", "-n", "-g"], stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while self.cli("core waitfullybooted", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Asterisk did not boot in 60 s (see {log})")
            time.sleep(0.5)

    def cli(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), "-C", str(self.conf), "-rx", command],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )

    def stop(self) -> None:
        self.cli("core stop now", check=False)


# -- the service ----------------------------------------------------------------------


def write_service_config(
    work: Path,
    stacks: list[Stack],
    redis_url: str = "memory://",
    pbx_id: str = "lab",
    changes: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Path:
    """One PBX's service config: the embedded store, or (cluster.py) a Redis shared by
    several PBXs, each with its own pbx_id. `changes` (the benches) sets keys over the
    lab's, per section: a key set to None is left out, and so is a section set to None."""
    runtime = work / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    key_file = work / "fastagi.key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, 0o600)
    sections: dict[str, dict[str, Any]] = {
        "server": {
            "listen": "127.0.0.1:4573",
            "runtime_dir": str(runtime),
            "session_timeout": "5s",
            "key_file": str(key_file),
            "state_dir": str(work / "state"),
        },
        "screening": {"threshold": THRESHOLD, "window": "10m", "ban_time": "1h", "pbx_id": pbx_id},
        "redis": {"url": redis_url},
        "firewall": {
            "backend": "nftables",
            "ports": [f"{s.port}/{proto}" for s in stacks for proto in ("udp", "tcp")],
            "sync_interval": "2s",
        },
        "auth": {
            "enabled": True,
            "username": AMI_USER,
            "secret": AMI_SECRET,
            "threshold": THRESHOLD,
        },
    }
    for name, keys in (changes or {}).items():
        if keys is None:
            sections.pop(name, None)
            continue
        section = sections.setdefault(name, {})
        for key, value in keys.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    path = work / "fastagi.toml"
    path.write_text(
        "\n".join(
            f"[{name}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in keys.items())
            for name, keys in sections.items()
        )
    )
    return path


def _toml(value: Any) -> str:
    """A TOML value from a bool, number, string or list of them (all a config holds)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return f"[{', '.join(map(_toml, value))}]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def ctl(config: Path, *args: str, ns: Namespace | None = None) -> subprocess.CompletedProcess[str]:
    """fastagi-ctl from the host (the embedded store's control socket is a Unix socket),
    or inside `ns` (a PBX that reaches a shared Redis over the namespaces' network)."""
    argv = [sys.executable, "-m", "fastagi.cli", "--config", str(config), *args]
    return subprocess.run(
        ns.argv(argv) if ns is not None else argv,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def counted(config: Path) -> dict[str, int]:
    status = json.loads(ctl(config, "status", "--json").stdout)
    counts = {c["ip"]: c["count"] for c in status["counted"]["list"]}
    counts.update({b["ip"]: THRESHOLD for b in status["banned"]["list"]})
    return counts


# -- SIP from the attacker's namespace -------------------------------------------------


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class Dialog:
    """One SIP client socket in the attacker's namespace: requests and their final answers."""

    def __init__(
        self,
        ns: Namespace,
        src: str,
        dst: str,
        port: int,
        proto: str,
        timeout: float,
        from_user: str = "scanner",
    ):
        self.from_user = from_user
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        self.sock = ns.socket(family, kind)
        self.sock.settimeout(timeout)
        self.sock.bind((src, 0))
        self.src, self.dst, self.port, self.proto = src, dst, port, proto
        self.lport = self.sock.getsockname()[1]
        self.call_id = f"{secrets.token_hex(8)}@{_host(src)}"
        self.tag = secrets.token_hex(4)
        if proto == "tcp":
            self.sock.connect((dst, port))

    def close(self) -> None:
        self.sock.close()

    def _send(self, text: str) -> None:
        data = text.encode("latin-1")
        if self.proto == "tcp":
            self.sock.sendall(data)
        else:
            self.sock.sendto(data, (self.dst, self.port))

    def request(self, method: str, user: str, cseq: int, extra: str = "") -> tuple[int, str] | None:
        """Send one request; its final response (code, text) once ACKed, or None."""
        ruri = f"sip:{user}@{_host(self.dst)}:{self.port}"
        caller = user if method == "REGISTER" else self.from_user
        head = (
            f"Via: SIP/2.0/{self.proto.upper()} {_host(self.src)}:{self.lport};branch=z9hG4bK"
            f"{secrets.token_hex(6)};rport\r\nMax-Forwards: 70\r\n"
            f'From: "lab" <sip:{caller}@{_host(self.dst)}>'
            f";tag={self.tag}\r\nCall-ID: {self.call_id}\r\n"
        )
        self._send(
            f"{method} {ruri} SIP/2.0\r\n{head}To: <sip:{user}@{_host(self.dst)}>\r\n"
            f"CSeq: {cseq} {method}\r\nContact: <sip:{user}@{_host(self.src)}:{self.lport}>\r\n"
            f"{extra}Content-Length: 0\r\n\r\n"
        )
        final = self._final()
        if final is not None and method == "INVITE":
            to = next(line for line in final[1].split("\r\n") if line.lower().startswith("to:"))
            with contextlib.suppress(OSError):
                self._send(
                    f"ACK {ruri} SIP/2.0\r\n{head}{to}\r\nCSeq: {cseq} ACK\r\n"
                    "Content-Length: 0\r\n\r\n"
                )
        return final

    def _final(self) -> tuple[int, str] | None:
        buffer = b""
        deadline = time.monotonic() + (self.sock.gettimeout() or 3)
        while time.monotonic() < deadline:
            data = self.sock.recv(65535)
            if not data:
                return None
            buffer = buffer + data if self.proto == "tcp" else data
            for message in buffer.split(b"\r\n\r\n"):
                text = message.decode("latin-1")
                match = re.match(r"SIP/2\.0 (\d{3})", text)
                if match and self.call_id in text and int(match.group(1)) >= 200:
                    return int(match.group(1)), text
        return None


def invite(
    ns: Namespace,
    src: str,
    dst: str,
    port: int,
    user: str,
    proto: str,
    timeout: float = 3,
    from_user: str = "scanner",
) -> int | None:
    """One guest INVITE (no SDP); the final response code, or None when nothing answered."""
    try:
        dialog = Dialog(ns, src, dst, port, proto, timeout, from_user)
    except OSError:
        return None
    try:
        final = dialog.request("INVITE", user, 1)
    except OSError:
        return None
    finally:
        dialog.close()
    return final[0] if final else None


def register_wrong_password(
    ns: Namespace, src: str, dst: str, port: int, sent: list[float] | None = None
) -> int | None:
    """REGISTER as the lab's endpoint with a wrong password (digest, RFC 2617): what a
    password guesser does; the final code of the answered attempt. `sent` gets the
    monotonic time the wrong password left (cluster.py times the ban from it)."""
    dialog = Dialog(ns, src, dst, port, "udp", 3)
    try:
        challenge = dialog.request("REGISTER", USER, 1, "Expires: 60\r\n")
        if challenge is None or challenge[0] != 401:
            return challenge[0] if challenge else None
        fields = dict(re.findall(r'(\w+)="?([^",]+)"?', challenge[1].split("Digest", 1)[1]))
        uri = f"sip:{USER}@{_host(dst)}:{port}"
        ha1 = _md5(f"{USER}:{fields['realm']}:wrong-{secrets.token_hex(3)}")
        ha2, cnonce = _md5(f"REGISTER:{uri}"), secrets.token_hex(4)
        qop = f'qop=auth, nc=00000001, cnonce="{cnonce}", '
        answer = _md5(f"{ha1}:{fields['nonce']}:00000001:{cnonce}:auth:{ha2}")
        if "qop" not in fields:
            qop, answer = "", _md5(f"{ha1}:{fields['nonce']}:{ha2}")
        auth = (
            f'Authorization: Digest username="{USER}", realm="{fields["realm"]}", '
            f'nonce="{fields["nonce"]}", uri="{uri}", response="{answer}", {qop}'
            "algorithm=MD5\r\n"
        )
        if sent is not None:
            sent.append(time.monotonic())
        final = dialog.request("REGISTER", USER, 2, f"Expires: 60\r\n{auth}")
        return final[0] if final else None
    except OSError:
        return None
    finally:
        dialog.close()


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# -- the checks -----------------------------------------------------------------------


def run_checks(topo: Topology, work: Path, inst: Path) -> list[Result]:
    stacks = stacks_of(inst)
    pbx, attacker = topo.pbx1, topo.attacker
    asterisk = Asterisk(inst, write_config(work, inst, stacks), pbx, work / "asterisk.out")
    config = write_service_config(work, stacks)
    with (work / "fastagi-serve.log").open("ab") as log:
        service = pbx.spawn(
            [sys.executable, "-m", "fastagi.cli", "--config", str(config), "serve"],
            stdout=log,
            stderr=log,
            cwd=str(ROOT),
        )
    deadline = time.monotonic() + 20
    while ctl(config, "status").returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fastagi-ctl serve did not start (see {work}/fastagi-serve.log)")
        time.sleep(0.2)
    results: list[Result] = [dialplan_loaded(work)]
    sources = iter(attacker.extra4)
    try:
        for stack in stacks:
            results += guest_calls(stack, pbx, attacker, config, sources)
        for stack, src in zip(stacks, attacker.extra4[5:7], strict=False):
            results.append(injections(stack, pbx, attacker, config, src))
        for stack, src in zip(stacks, attacker.extra4[1:3], strict=False):
            results.append(hostile_from_user(stack, pbx, attacker, config, src))
        modules = inst / "lib" / "asterisk" / "modules"
        if all((modules / m).exists() for m in ("res_clioriginate.so", "func_uri.so")):
            results.append(local_channel_caller_id(asterisk, config))
        results.append(wrong_key(asterisk, stacks[-1], pbx, attacker, config, work))
        for stack in stacks:
            results.append(odd_extensions(stack, pbx, attacker, config, attacker.extra4[8]))
        results.append(ban_on_the_wire(stacks[0], pbx, attacker, config))
        results.append(password_guesser(stacks[-1], pbx, attacker, config, attacker.extra4[7]))
        results.append(svcrack(stacks[0], pbx, attacker, config))
        guessers = {}
        for stack, src in zip(stacks, attacker.extra4[3:5], strict=False):
            codes = [register_wrong_password(attacker, src, pbx.ipv4, stack.port) for _ in "123"]
            guessers[src] = f"{stack.name} REGISTER wrong password x3 -> {codes}"
        time.sleep(1)  # Asterisk's logger writes asynchronously
        results.append(filters(work / "var" / "log", guessers, callers=set(counted(config))))
        service.terminate()
        service.wait(10)
        for stack in stacks:
            results.append(server_down(stack, pbx, attacker, work, attacker.extra4[2]))
    finally:
        asterisk.stop()
        version = asterisk_version(inst)
        (work / "results.json").write_text(
            json.dumps({"asterisk": version, "results": [r.__dict__ for r in results]}, indent=2)
        )
    return results


def guest_calls(stack, pbx, attacker, config, sources) -> list[Result]:
    """An ordinary guest call per transport: answered 403, counted once, on its address."""
    results = []
    for proto in stack.transports:
        src = ATTACKER6 if proto.endswith("6") else next(sources)
        dst = pbx.ipv6 if proto.endswith("6") else pbx.ipv4
        before = counted(config).get(_counted_key(config, src), 0)
        code = invite(attacker, src, dst, stack.port, "7001", proto[:3])
        after = counted(config).get(_counted_key(config, src), 0)
        ok = code == 403 and after == before + 1
        results.append(
            Result(
                f"{stack.name} {proto}: guest call screened",
                ok,
                f"{src} -> {code}, count {before} -> {after}",
            )
        )
    return results


def _counted_key(config: Path, src: str) -> str:
    """The key `status` counts `src` under (its /64 for IPv6: `ipv6_prefix`)."""
    report = ctl(config, "status", src, "--json")
    with contextlib.suppress(ValueError, KeyError):
        return json.loads(report.stdout)["ip"]
    return src


def injections(stack, pbx, attacker, config, src) -> Result:
    """The captured injection payloads: each counted on the true address, never FORGED."""
    codes = [invite(attacker, src, pbx.ipv4, stack.port, user, "udp") for user in INJECTIONS]
    counts = counted(config)
    ok = FORGED not in counts and counts.get(src, 0) >= 1
    return Result(
        f"{stack.name}: injection INVITEs count the sender only",
        ok,
        f"answers {codes}; counted {counts.get(src, 0)} for {src}, "
        f"{counts.get(FORGED, 0)} for {FORGED}",
    )


def hostile_from_user(stack, pbx, attacker, config, src) -> Result:
    """A From user that URL-decodes to a line feed and a forged `agi_arg_1`: the caller-ID
    guard of the shipped dialplan takes it to [fastagi-bad-exten]; counted on the sender,
    the forged address never."""
    before = counted(config).get(src, 0)
    code = invite(attacker, src, pbx.ipv4, stack.port, "7001", "udp", from_user=HOSTILE_FROM)
    counts = counted(config)
    ok = code == 403 and counts.get(src, 0) == before + 1 and FORGED_SOURCE not in counts
    return Result(
        f"{stack.name}: From user with a forged agi_arg_1 counts the sender only",
        ok,
        f"{src} -> {code}, count {before} -> {counts.get(src, 0)}, "
        f"{counts.get(FORGED_SOURCE, 0)} for {FORGED_SOURCE}",
    )


def local_channel_caller_id(asterisk: Asterisk, config: Path) -> Result:
    """Issue 12: on a Local channel (no address of its own) a caller ID with a line feed
    forged `agi_arg_1` before Asterisk's own lines. The server trusts no SOURCE in such a
    block; a clean block's SOURCE is counted. Needs res_clioriginate (channel originate),
    app_dial (its Local channels) and func_uri (URIDECODE makes the line feed)."""
    said = []
    for exten in ("forged", "forged-source", "clean-source"):
        out = asterisk.cli(f"channel originate Local/{exten}@fastagi-lab-local application Wait 1")
        said.append((out.stdout + out.stderr).strip())
    time.sleep(2)
    counts = counted(config)
    ok = FORGED_SOURCE not in counts and counts.get(LOCAL_SOURCE, 0) == 1
    return Result(
        "Local channel: a caller ID line feed never counts the forged agi_arg_1",
        ok,
        f"counted {counts.get(FORGED_SOURCE, 0)} for {FORGED_SOURCE}, "
        f"{counts.get(LOCAL_SOURCE, 0)} for the clean SOURCE {LOCAL_SOURCE} (1 expected)"
        f"{'' if ok else f'; CLI: {said}'}",
    )


def wrong_key(asterisk: Asterisk, stack, pbx, attacker, config, work: Path) -> Result:
    """Asterisk with another key than the service: the session is closed with nothing
    executed, the call fails open (still 403 here), nothing counted, the key not logged."""
    src = attacker.extra4[0]
    asterisk.cli(f"dialplan set global FASTAGI_KEY {secrets.token_hex(16)}")
    try:
        before, notices = counted(config).get(src, 0), notice_lines(work, src)
        code = invite(attacker, src, pbx.ipv4, stack.port, "7001", "udp")
        after = counted(config).get(src, 0)
    finally:
        asterisk.cli(f"dialplan set global FASTAGI_KEY {KEY}")
    log = (work / "fastagi-serve.log").read_text()
    logged = notice_lines(work, src) - notices
    ok = code == 403 and after == before and "wrong or missing key" in log and KEY not in log
    ok = ok and logged == 1
    return Result(
        f"{stack.name} udp: wrong key in the AGI URL: closed, fails open, not counted, NOTICE",
        ok,
        f"{src} -> {code}, count {before} -> {after}, {logged} NOTICE line by the dialplan; "
        f"service log names the refusal, {'never' if KEY not in log else 'SHOWS'} the key",
    )


def notice_lines(work: Path, src: str) -> int:
    """The seed's NOTICE lines for `src` in Asterisk's messages log so far."""
    time.sleep(0.5)  # Asterisk's logger writes asynchronously
    text = (work / "var" / "log" / "messages").read_text(errors="replace")
    return text.count(f"failed for {src} - Unknown connection from peer\n")


def dialplan_loaded(work: Path) -> Result:
    """The shipped dialplan loads without a WARNING (`_.` printed one per line)."""
    text = (work / "var" / "log" / "messages").read_text(errors="replace")
    warnings = [line for line in text.splitlines() if "WARNING" in line and "pbx_config" in line]
    return Result(
        "the shipped dialplan loads without WARNINGs",
        not warnings,
        f"{len(warnings)} pbx_config WARNING lines"
        + (f", first: {warnings[0][-120:]}" if warnings else ""),
    )


def odd_extensions(stack, pbx, attacker, config, src) -> Result:
    """A guest dialing `h` (the hangup extension's name) or a lone `-` (which `_.`
    left unmatched: 484, no log line) is screened like any other."""
    codes, before = [], counted(config).get(src, 0)
    for user in ("h", "-"):
        codes.append(invite(attacker, src, pbx.ipv4, stack.port, user, "udp"))
    after = counted(config).get(src, 0)
    return Result(
        f"{stack.name}: a guest dialing 'h' or '-' is screened",
        codes == [403, 403] and after == before + 2,
        f"{src} -> {codes}, count {before} -> {after}",
    )


def server_down(stack, pbx, attacker, work: Path, src: str) -> Result:
    """fastagi-ctl serve stopped: the call fails open and the dialplan logs the NOTICE
    with the address from the channel driver."""
    before = notice_lines(work, src)
    code = invite(attacker, src, pbx.ipv4, stack.port, "7001", "udp")
    logged = notice_lines(work, src) - before
    return Result(
        f"{stack.name}: server down: fails open, the dialplan logs the NOTICE",
        code == 403 and logged == 1,
        f"{src} -> {code}, {logged} NOTICE line for {src}",
    )


def ban_on_the_wire(stack, pbx, attacker, config) -> Result:
    """At the threshold the caller's next INVITE gets no answer; `unban` restores it."""
    src, dst = attacker.ipv4, pbx.ipv4
    codes = [invite(attacker, src, dst, stack.port, "7001", "udp") for _ in range(THRESHOLD)]
    time.sleep(0.5)  # the agent applies the ban within milliseconds; be generous
    banned = invite(attacker, src, dst, stack.port, "7001", "udp", timeout=2)
    other = invite(attacker, attacker.extra4[0], dst, stack.port, "7001", "udp")
    lifted = ctl(config, "unban", src).returncode == 0
    time.sleep(0.5)
    after = invite(attacker, src, dst, stack.port, "7001", "udp")
    ok = banned is None and other == 403 and lifted and after == 403
    return Result(
        f"{stack.name} udp: ban on the wire, unban restores",
        ok,
        f"calls {codes}, then {banned} (banned), other caller {other}, after unban {after}",
    )


def password_guesser(stack, pbx, attacker, config, src) -> Result:
    """Wrong-password REGISTERs, counted from Asterisk's own AMI security events (the
    `[auth]` watcher): at the threshold the guesser's REGISTERs go unanswered."""
    codes: list[int | None] = []
    started = time.monotonic()
    while len(codes) < THRESHOLD + 3 and (not codes or codes[-1] is not None):
        codes.append(register_wrong_password(attacker, src, pbx.ipv4, stack.port))
        time.sleep(0.2)  # five guesses a second: the ban has time to land between them
    dropped_after = time.monotonic() - started
    report = json.loads(ctl(config, "status", src, "--json").stdout or "{}")
    holds = [h["source"] for h in report.get("holds", [])]
    answered = [c for c in codes if c is not None]
    ok = codes[-1] is None and len(answered) <= THRESHOLD + 2 and "auth" in holds
    ctl(config, "unban", src)
    return Result(
        f"{stack.name}: password guesser banned from AMI security events",
        ok,
        f"{src}: REGISTER answers {codes} ({dropped_after:.1f} s), then dropped; holds {holds}",
    )


def svcrack(stack, pbx, attacker, config) -> Result:
    """sipvicious's svcrack against the real account: banned by the AMI watcher."""
    tool = shutil.which("svcrack") or shutil.which("sipvicious_svcrack")
    if tool is None:
        return Result("svcrack banned (AMI)", False, "svcrack not installed (apt sipvicious)")
    src = attacker.ipv4
    started = time.monotonic()
    run = attacker.run(
        [tool, "-u", USER, "-r", "1000-1099", "-p", str(stack.port), pbx.ipv4],
        check=False,
        timeout=120,
    )
    took = time.monotonic() - started
    report = json.loads(ctl(config, "status", src, "--json").stdout or "{}")
    holds = [h["source"] for h in report.get("holds", [])]
    ok = report.get("banned") is True and "auth" in holds and "correct-horse" not in run.stdout
    ctl(config, "unban", src)
    return Result(
        f"{stack.name}: svcrack banned from AMI security events",
        ok,
        f"{src} banned {report.get('banned')} (holds {holds}); svcrack ran {took:.0f} s",
    )


def filters(logdir: Path, guessers: dict[str, str], callers: set[str]) -> Result:
    """The shipped fail2ban filters over the logs this run made: every password guesser
    and every screened caller found with its true address, never the forged one."""
    regex = shutil.which("fail2ban-regex")
    if regex is None:
        return Result("fail2ban-regex over the run's logs", False, "fail2ban-regex not installed")
    found: dict[str, set[str]] = {}
    for conf in sorted((ROOT / "deploy" / "fail2ban" / "filter.d").glob("*.conf")):
        for log in ("messages", "security"):
            out = subprocess.run(
                [regex, "-o", "ip", str(logdir / log), str(conf)],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
            found.setdefault(conf.stem, set()).update(
                line.strip()
                for line in out.splitlines()
                if re.fullmatch(r"[0-9a-f.:]+", line.strip())
            )
    every = set().union(*found.values())
    missing = sorted((set(guessers) | {c for c in callers if "/" not in c}) - every)
    ok = not missing and FORGED not in every
    shown = "; ".join(f"{name}: {', '.join(sorted(ips))}" for name, ips in found.items())
    return Result(
        "fail2ban-regex over the run's logs: true addresses only",
        ok,
        f"{shown}; missing {missing or 'none'}; {'; '.join(guessers.values())}",
    )


def table(version: str, results: list[Result]) -> str:
    lines = [
        f"Asterisk {version}, {time.strftime('%Y-%m-%d')}",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {r.check} | {'pass' if r.ok else 'FAIL'} | {r.detail} |" for r in results]
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="fastagi-lab-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None, on_table: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asterisk", required=True, help="install prefix (PREFIX/inst)")
    parser.add_argument("--work", help="keep configs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    inst = Path(args.asterisk).resolve()
    if os.geteuid() != 0:
        print("lab.py: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    version = asterisk_version(inst)
    with workdir(args.work) as work:
        topo = make_topology(HOSTS)
        try:
            topo.attacker.run(["ip", "addr", "add", f"{ATTACKER6}/64", "dev", "eth0", "nodad"])
            topo.pbx1.run(["ip", "route", "add", NET6, "dev", "eth0"])
            results = run_checks(topo, work, inst)
        finally:
            topo.close()
    on_table(table(version, results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
