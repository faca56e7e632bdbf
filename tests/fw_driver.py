"""Drive a firewall backend that runs inside a network namespace.

Run as a script (`ip netns exec NS python fw_driver.py SETTINGS_JSON`) it reads one JSON
request per line on stdin and answers one JSON line per request. Imported, it gives
`FirewallDriver`, a client with the backend's own methods:

    with FirewallDriver(topo.pbx1, FirewallSettings(backend="nftables")) as fw:
        fw.setup(); fw.add({"192.0.2.10": time.time() + 60}); fw.list()

Each answer carries `elapsed`: the seconds the backend call took, measured inside the
namespace (no IPC or JSON in it), which the benchmark reports.
"""

from __future__ import annotations

import ipaddress
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _encode_until(until: float | None) -> Any:
    if until is None:
        return None
    return "inf" if math.isinf(until) else until


def _decode_until(value: Any) -> float | None:
    if value is None:
        return None
    return math.inf if value == "inf" else float(value)


def serve() -> None:
    from fastagi.addresses import parse_target, target_text
    from fastagi.firewall import FirewallSettings, create

    raw = json.loads(sys.argv[1])
    if isinstance(raw.get("ports"), list):
        raw["ports"] = tuple(raw["ports"])
    fw = create(FirewallSettings(**raw))
    for line in sys.stdin:
        request = json.loads(line)
        op, arg = request["op"], request.get("arg")
        started = time.perf_counter()
        try:
            if op in ("add", "set"):
                result = getattr(fw, op)(
                    {parse_target(a): _decode_until(u) for a, u in arg.items()}
                )
            elif op == "intact":
                result = fw.intact({parse_target(a): _decode_until(u) for a, u in arg.items()})
            elif op == "bulk_intact":  # intact() against what bulk_set loaded
                count, seconds = arg
                base = int(ipaddress.IPv4Address("10.0.0.0"))
                now = time.time()
                bans = {ipaddress.IPv4Network(base + i): now + seconds for i in range(count)}
                started = time.perf_counter()
                result = fw.intact(bans)
            elif op == "delete":
                result = fw.delete([parse_target(a) for a in arg])
            elif op == "expire":
                result = [target_text(a) for a in fw.expire(arg)]
            elif op == "list":
                result = {target_text(a): _encode_until(u) for a, u in fw.list().items()}
            elif op == "claim":
                result = fw.claim()
            elif op == "check":
                result = [asdict(c) for c in fw.check()]
            elif op == "stats":
                result = asdict(fw.stats())
            elif op == "bulk_set":  # generated here: 100,000 addresses need no IPC
                count, seconds = arg
                base = int(ipaddress.IPv4Address("10.0.0.0"))
                now = time.time()
                bans = {ipaddress.IPv4Network(base + i): now + seconds for i in range(count)}
                started = time.perf_counter()
                result = fw.set(bans)
            else:
                result = getattr(fw, op)()
            answer = {"ok": True, "result": result}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        answer["elapsed"] = time.perf_counter() - started
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class DriverError(RuntimeError):
    pass


class FirewallDriver:
    """A backend running in `ns` (a tests.netns.Namespace), called like the backend."""

    def __init__(self, ns: Any, settings: Any, timeout: float = 60) -> None:
        raw = asdict(settings)
        if isinstance(raw["ports"], tuple):
            raw["ports"] = list(raw["ports"])
        self.ns = ns
        self.name = settings.backend  # as the backend names itself, for an agent driving it
        self.timeout = timeout
        self.last_elapsed = 0.0
        self.proc = subprocess.Popen(
            ns.argv([sys.executable, str(HERE), json.dumps(raw)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, arg: Any = None) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": op, "arg": arg}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise DriverError(f"firewall driver died during {op}: {err.strip()[-500:]}")
        answer = json.loads(line)
        self.last_elapsed = answer["elapsed"]
        if not answer["ok"]:
            raise DriverError(answer["error"])
        return answer["result"]

    def setup(self) -> None:
        self.call("setup")

    def teardown(self) -> None:
        self.call("teardown")

    def add(self, bans: dict[str, float]) -> None:
        self.call("add", {str(a): _encode_until(u) for a, u in bans.items()})

    def set(self, bans: dict[str, float]) -> None:
        self.call("set", {str(a): _encode_until(u) for a, u in bans.items()})

    def delete(self, addresses: list[str]) -> None:
        self.call("delete", [str(a) for a in addresses])

    def expire(self, now: float | None = None) -> list[str]:
        return self.call("expire", now)

    def intact(self, bans: dict[str, float]) -> bool:
        return self.call("intact", {str(a): _encode_until(u) for a, u in bans.items()})

    def list(self) -> dict[str, float | None]:
        return {a: _decode_until(u) for a, u in self.call("list").items()}

    def check(self) -> list[dict[str, Any]]:
        return self.call("check")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()

    def __enter__(self) -> FirewallDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    serve()
