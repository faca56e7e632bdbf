"""The ipset backend: two `hash:ip` sets with kernel timeouts, matched from our chain.

    ipset:     fastagi-v4 (hash:ip family inet timeout 0), fastagi-v6 (family inet6)
    iptables:  -N FASTAGI; -A FASTAGI -m set --match-set fastagi-v4 src -j DROP
               -I INPUT -j FASTAGI            (and FORWARD with firewall.forward)
    ip6tables: the same with fastagi-v6

Updates go through `ipset restore -exist` batches (one fork per call, 100,000 entries in
well under a second); set() fills a temporary set and swaps it in atomically. The chain
and rules are made with the `iptables`/`ip6tables` commands the host uses (nf_tables or
legacy: both match ipsets), through `iptables-restore --noflush` so our chain is written
in one go; we touch nothing but our chain, its jumps and our sets. Bans expire in the
kernel even when the agent is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Mapping

from ._common import (
    INTACT_SLACK,
    as_address,
    count_replaced,
    parse_ports,
    permission_hint,
    ports_by_proto,
    remaining_ms,
    run,
    split_live,
    tool_check,
)
from .base import CheckResult, FirewallError, FirewallSettings, FirewallStats, IPAddress

log = logging.getLogger("fastagi.firewall")

MAXELEM = 1_048_576
MAX_TIMEOUT_S = 2_147_483  # ipset's limit; longer bans are re-added by the reconcile
HOOKS = ("INPUT", "FORWARD")


class IpsetFirewall:
    name = "ipset"
    intact_sees_entries = True  # intact() checks the entries too: no periodic rewrite

    def __init__(self, settings: FirewallSettings | None = None) -> None:
        self.settings = settings or FirewallSettings(backend="ipset")
        self.chain = self.settings.chain
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,20}", self.chain):
            raise FirewallError(
                f"firewall.chain: {self.chain!r} is not usable as a chain/set name "
                "(letters, digits, _ and -, at most 21 characters)"
            )
        base = self.chain.lower()
        self.sets = {4: f"{base}-v4", 6: f"{base}-v6"}
        self._ports = parse_ports(self.settings.ports)
        self._lock = threading.Lock()
        self._known: dict[IPAddress, float] = {}
        self._stats = FirewallStats(backend=self.name)
        self._announced = False  # setup() runs every sync: say it at INFO once

    # -- helpers -------------------------------------------------------------------------
    def _ipset(self, script: str) -> None:
        try:
            run(["ipset", "restore", "-exist"], stdin=script)
        except FirewallError as exc:
            self._stats.errors += 1
            if "does not exist" in str(exc):
                raise FirewallError(
                    f"ipset: sets {self.sets[4]}/{self.sets[6]} are missing: the agent creates "
                    f"them at start (setup) ({exc})"
                ) from exc
            raise

    def _create_lines(self, version: int, name: str) -> list[str]:
        family = "inet" if version == 4 else "inet6"
        return [f"create {name} hash:ip family {family} timeout 0 maxelem {MAXELEM}"]

    def _add_lines(
        self, name_of: dict[int, str], bans: Mapping[IPAddress, float], now: float
    ) -> list[str]:
        lines = []
        for address, until in bans.items():
            ms = remaining_ms(until, now, MAX_TIMEOUT_S * 1000)
            timeout = 0 if ms is None else math.ceil(ms / 1000)
            lines.append(f"add {name_of[address.version]} {address} timeout {timeout}")
        return lines

    @staticmethod
    def _tool(version: int) -> str:
        return "iptables" if version == 4 else "ip6tables"

    def _rules(self, version: int) -> list[str]:
        match = f"-m set --match-set {self.sets[version]} src -j DROP"
        if self._ports is None:
            return [f"-A {self.chain} {match}"]
        return [
            f"-A {self.chain} -p {proto} -m multiport --dports "
            f"{','.join(s.iptables() for s in specs)} {match}"
            for proto, specs in ports_by_proto(self._ports).items()
        ]

    def _has_jump(self, tool: str, hook: str) -> bool:
        try:
            run([tool, "-w", "-C", hook, "-j", self.chain])
            return True
        except FirewallError:
            return False

    def _chain_exists(self, tool: str) -> bool:
        try:
            run([tool, "-w", "-n", "-L", self.chain])
            return True
        except FirewallError:
            return False

    # -- the interface -------------------------------------------------------------------
    def setup(self) -> None:
        with self._lock:
            self._ipset(
                "\n".join(self._create_lines(4, self.sets[4]) + self._create_lines(6, self.sets[6]))
                + "\n"
            )
            for version in (4, 6):
                tool = self._tool(version)
                # declaring the chain in a --noflush restore empties it: rules are rewritten
                # in one go, without duplicates, and nothing else is touched
                batch = ["*filter", f":{self.chain} - [0:0]", *self._rules(version), "COMMIT"]
                run([f"{tool}-restore", "-w", "--noflush"], stdin="\n".join(batch) + "\n")
                hooks = HOOKS if self.settings.forward else HOOKS[:1]
                for hook in HOOKS:
                    if hook in hooks:
                        if not self._has_jump(tool, hook):
                            run([tool, "-w", "-I", hook, "1", "-j", self.chain])
                    else:
                        self._drop_jumps(tool, hook)
        log.log(
            logging.DEBUG if self._announced else logging.INFO,
            "ipset: sets %s, %s and chain %s ready",
            self.sets[4],
            self.sets[6],
            self.chain,
        )
        self._announced = True

    def _drop_jumps(self, tool: str, hook: str) -> None:
        for _ in range(16):  # bounded: a jump inserted twice by hand goes too
            if not self._has_jump(tool, hook):
                return
            run([tool, "-w", "-D", hook, "-j", self.chain])

    def add(self, bans: Mapping[IPAddress, float]) -> None:
        now = time.time()
        live, past = split_live(bans, now)
        # -exist: re-adding refreshes the timeout; deleting what is absent is no error
        lines = self._add_lines(self.sets, live, now)
        lines += [f"del {self.sets[a.version]} {a}" for a in past]
        if not lines:
            return
        with self._lock:
            self._ipset("\n".join(lines) + "\n")
            self._known.update(live)
            for address in past:
                self._known.pop(address, None)
            self._stats.adds += len(live)

    def delete(self, addresses: Iterable[IPAddress]) -> None:
        gone = {as_address(a) for a in addresses}
        if not gone:
            return
        with self._lock:
            self._ipset("\n".join(f"del {self.sets[a.version]} {a}" for a in gone) + "\n")
            for address in gone:
                self._known.pop(address, None)
            self._stats.deletes += len(gone)

    def set(self, bans: Mapping[IPAddress, float]) -> None:
        now = time.time()
        live, _ = split_live(bans, now)
        tmp = {v: f"{name}-tmp" for v, name in self.sets.items()}
        lines: list[str] = []
        for version in (4, 6):
            lines += self._create_lines(version, tmp[version])
            lines.append(f"flush {tmp[version]}")
        lines += self._add_lines(tmp, live, now)
        for version in (4, 6):
            lines += [f"swap {tmp[version]} {self.sets[version]}", f"destroy {tmp[version]}"]
        with self._lock:
            try:
                self._ipset("\n".join(lines) + "\n")
            except FirewallError:
                for name in tmp.values():  # leave no half-filled temporary set behind
                    with contextlib.suppress(FirewallError):
                        run(["ipset", "destroy", name])
                raise
            count_replaced(self._stats, self._known, live)
            self._known = dict(live)

    def expire(self, now: float | None = None) -> list[IPAddress]:
        return []  # the kernel does it

    def list(self) -> dict[IPAddress, float | None]:
        now = time.time()
        out: dict[IPAddress, float | None] = {}
        for name in self.sets.values():
            text = run(["ipset", "list", name, "-o", "save"])
            for line in text.splitlines():
                parts = line.split()
                if len(parts) < 3 or parts[0] != "add":
                    continue
                try:
                    address = ipaddress.ip_address(parts[2])
                except ValueError:
                    continue
                until: float = math.inf
                if "timeout" in parts[3:]:
                    seconds = int(parts[parts.index("timeout") + 1])
                    until = math.inf if seconds == 0 else now + seconds
                out[address] = until
        return out

    def intact(self, expected: Mapping[IPAddress, float]) -> bool:
        """Both sets exist and hold as many entries as we put there (headers only)."""
        now = time.time() + INTACT_SLACK
        low, high = {4: 0, 6: 0}, {4: 0, 6: 0}
        for address, until in expected.items():  # addresses from the agent: parsed already
            version = address.version
            high[version] += 1
            if until > now:
                low[version] += 1
        for version, name in self.sets.items():
            try:
                header = run(["ipset", "list", "-t", name])
            except FirewallError:
                return False
            found = re.search(r"^Number of entries:\s*(\d+)", header, re.MULTILINE)
            if found is None or not low[version] <= int(found.group(1)) <= high[version]:
                return False
        return True

    def teardown(self) -> None:
        with self._lock:
            for version in (4, 6):
                tool = self._tool(version)
                for hook in HOOKS:
                    self._drop_jumps(tool, hook)
                if self._chain_exists(tool):
                    run([tool, "-w", "-F", self.chain])
                    run([tool, "-w", "-X", self.chain])
            names = [*self.sets.values(), *(f"{n}-tmp" for n in self.sets.values())]
            existing = set(run(["ipset", "list", "-n"]).split())
            for name in names:
                if name in existing:
                    run(["ipset", "destroy", name])
            self._known.clear()
        log.info("ipset: chain %s and sets %s, %s removed", self.chain, *self.sets.values())

    def check(self) -> list[CheckResult]:
        results = []
        result, _ = tool_check("ipset command", ["ipset", "version"])
        results.append(result)
        for tool in ("iptables", "ip6tables"):
            result, _ = tool_check(f"{tool} command", [tool, "-V"])
            results.append(result)
        if not results[0].ok:
            return results
        probe = f"fastagi-chk{int(time.time() * 1000) % 100000}"
        try:
            run(["ipset", "create", probe, "hash:ip", "family", "inet6", "timeout", "1"])
            run(["ipset", "destroy", probe])
            results.append(
                CheckResult("ipset kernel support", True, "ip_set hash:ip with timeouts works here")
            )
        except FirewallError as exc:
            results.append(CheckResult("ipset kernel support", False, permission_hint(str(exc))))
            return results
        try:
            sizes = {
                n: len(run(["ipset", "list", n, "-o", "save"]).splitlines()) - 1
                for n in self.sets.values()
            }
            jumps = self._has_jump("iptables", "INPUT") and self._has_jump("ip6tables", "INPUT")
            results.append(
                CheckResult(
                    f"ipset sets {', '.join(self.sets.values())}",
                    jumps,
                    f"present, {sum(sizes.values())} bans"
                    + ("" if jumps else f"; but no jump to {self.chain} from INPUT: run the agent"),
                )
            )
        except FirewallError:
            results.append(
                CheckResult(
                    f"ipset sets {', '.join(self.sets.values())}",
                    True,
                    "not created yet; the agent creates them at start",
                )
            )
        return results

    def stats(self) -> FirewallStats:
        now = time.time()
        with self._lock:
            self._known = {a: u for a, u in self._known.items() if u > now}
            return FirewallStats(
                self.name,
                len(self._known),
                self._stats.adds,
                self._stats.deletes,
                self._stats.errors,
                {"sets": ",".join(self.sets.values()), "chain": self.chain},
            )
